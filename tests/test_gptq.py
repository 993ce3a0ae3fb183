"""GPTQ batched over experts, and the routed Hessians it is solved with.

The batched solver is checked against a plain transcription of the paper's algorithm for one 2D weight
(column by column, no lazy batching), so blocking, batching, act-order and group bookkeeping are all
compared with the simplest possible statement of the method. Exact code equality is asserted in float64,
where a rounding flip between the two summation orders is vanishingly unlikely.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from moeconvert.pipeline import _layer_mean
from moeconvert.quant import gptq
from moeconvert.quant.gptq import gptq_quantize
from moeconvert.quant.hessian import SYMMETRIZE_TILE, HessianAccumulator, ReplayedAccumulator
from moeconvert.quant.rtn import compute_qparams, dequantize, quantize_codes, rtn_quantize
from moeconvert.quant.scheme import Scheme


def reference_gptq(w: torch.Tensor, H: torch.Tensor, scheme: Scheme):
    """GPTQ for one weight ``[out, in]`` exactly as the paper states it, in float64, one column at a time."""
    W = w.double().clone()
    H = H.double().clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    group = scheme.effective_group_size(columns)
    static = [compute_qparams(W[:, g : g + group], scheme) for g in range(0, columns, group)]
    perm = torch.arange(columns)
    if scheme.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += scheme.damp * torch.mean(torch.diag(H)) * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(W.shape, dtype=torch.uint8)
    scales, zeros = [], []
    for j in range(columns):
        if scheme.static_groups:  # the natural group's scale, fixed before the solve
            scale, zero = static[int(perm[j]) // group]
        elif j % group == 0:
            scale, zero = compute_qparams(W[:, j : j + group], scheme)
            scales.append(scale)
            zeros.append(zero)
        q = quantize_codes(W[:, j : j + 1], scale, zero, scheme.maxq)
        Q[:, j : j + 1] = q
        err = (W[:, j : j + 1] - dequantize(q, scale, zero).double()) / Hinv[j, j]
        W[:, j:] -= err * Hinv[j : j + 1, j:]
    position = torch.argsort(perm)
    g_idx = (position // group).int()
    if scheme.static_groups:  # groups of consecutive columns
        scales, zeros = [s for s, _ in static], [z for _, z in static]
        g_idx = (torch.arange(columns) // group).int()
    return Q[:, position], torch.cat(scales, 1), torch.cat(zeros, 1).int(), g_idx


def correlated_inputs(tokens: int, features: int, generator: torch.Generator) -> torch.Tensor:
    mixing = torch.randn(features, features, generator=generator)
    return torch.randn(tokens, features, generator=generator) @ mixing


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


def top_k_routing(tokens: int, experts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=generator).topk(k, dim=-1).indices


def expert_stack(experts=3, out=16, columns=96, seed=0):
    """Weights and per-expert Hessians from correlated inputs; expert 1 has a dead input column."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(experts, out, columns, generator=gen, dtype=torch.float64)
    hessians = []
    for expert in range(experts):
        x = correlated_inputs(4 * columns, columns, gen)
        if expert == 1:
            x[:, 5] = 0
        hessians.append(hessian_of(x))
    return W, torch.stack(hessians)


SCHEMES = (
    [
        Scheme(bits=bits, group_size=group, sym=sym, act_order=act, static_groups=False, block_size=64)
        for bits in (4, 8)
        for group in (32, -1)
        for sym in (True, False)
        for act in (False, True)
    ]
    + [
        Scheme(
            bits=4, group_size=64, block_size=32, act_order=False, static_groups=False
        ),  # groups span blocks
        Scheme(
            bits=4, group_size=48, block_size=64, act_order=True, static_groups=False
        ),  # block realigned to the groups
        Scheme(
            bits=4, group_size=40, block_size=128, sym=False, act_order=False, static_groups=False
        ),  # short last group
    ]
    + [
        Scheme(bits=4, group_size=group, sym=sym, act_order=act, static_groups=True, block_size=64)
        for group in (32, 40, -1)
        for sym in (True, False)
        for act in (False, True)
    ]
)


def scheme_id(s: Scheme) -> str:
    order = "act" if s.act_order else "seq"
    return f"{s.label}-{order}{'-static' if s.static_groups else ''}-b{s.block_size}"


FACTOR_PATHS = {  # 96 columns: one solve block a panel, or panels of several (with 32-column blocks)
    "default": {},
    "one-block-panels": {"FACTOR_PANEL_MAX": 0},
    "wide-panels": {"FACTOR_PANEL_DIVISOR": 1},
}


@pytest.fixture(params=list(FACTOR_PATHS))
def factor_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way the solver may factor the Hessian (:func:`moeconvert.quant.gptq._try_factor`)."""
    for name, value in FACTOR_PATHS[request.param].items():
        monkeypatch.setattr(gptq, name, value)
    return request.param


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_batched_equals_per_expert_reference(scheme: Scheme, factor_path: str) -> None:
    W, H = expert_stack()
    got = gptq_quantize(W, H, scheme, compute_dtype=torch.float64)
    for expert in range(W.shape[0]):
        codes, scale, zero, g_idx = reference_gptq(W[expert], H[expert], scheme)
        assert torch.equal(got.codes[expert], codes)
        torch.testing.assert_close(got.scale[expert], scale, rtol=1e-6, atol=0)
        assert torch.equal(got.zero[expert], zero)
        if scheme.act_order and not scheme.static_groups:
            assert torch.equal(got.g_idx[expert], g_idx)
    if not scheme.act_order or scheme.static_groups:
        assert got.g_idx is None  # static groups keep consecutive columns together, as without act-order
    assert (
        got.codes.dtype == torch.uint8 and got.scale.dtype == torch.float32 and got.zero.dtype == torch.int32
    )
    dead_column = got.dequantize()[1][:, 5]
    assert torch.equal(dead_column, torch.zeros_like(dead_column))


def test_float32_solve_matches_float64_reference() -> None:
    W, H = expert_stack(seed=3)
    scheme = Scheme(bits=4, group_size=32, act_order=True, static_groups=False, block_size=64)
    got = gptq_quantize(W.float(), H.float(), scheme)
    for expert in range(W.shape[0]):
        codes, *_ = reference_gptq(W[expert], H[expert], scheme)
        assert (got.codes[expert] == codes).float().mean() > 0.99


def test_act_order_g_idx_is_per_expert_and_dequantizes() -> None:
    W, H = expert_stack()
    scheme = Scheme(bits=4, group_size=32, act_order=True, static_groups=False, block_size=64)
    got = gptq_quantize(W, H, scheme, compute_dtype=torch.float64)
    assert got.g_idx.shape == (W.shape[0], W.shape[2]) and got.g_idx.dtype == torch.int32
    assert not torch.equal(got.g_idx[0], got.g_idx[2]), "each expert has its own column order"
    for expert in range(W.shape[0]):
        assert torch.equal(torch.bincount(got.g_idx[expert]), torch.full((3,), 32))
        index = got.g_idx[expert].long().expand(W.shape[1], -1)
        manual = dequantize(
            got.codes[expert], got.scale[expert].gather(1, index), got.zero[expert].gather(1, index)
        )
        assert torch.equal(got.dequantize()[expert], manual)


def test_single_weight_and_expert_chunks_match_the_stack() -> None:
    W, H = expert_stack()
    scheme = Scheme(bits=4, group_size=32, act_order=True, static_groups=False, block_size=64)
    whole = gptq_quantize(W, H, scheme, compute_dtype=torch.float64)
    chunked = gptq_quantize(W, H, scheme, compute_dtype=torch.float64, max_experts_per_chunk=2)
    single = gptq_quantize(W[2], H[2], scheme, compute_dtype=torch.float64)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.g_idx, whole.g_idx)
    torch.testing.assert_close(chunked.scale, whole.scale)
    assert single.codes.shape == W.shape[1:] and single.g_idx.shape == (W.shape[2],)
    assert torch.equal(single.codes, whole.codes[2]) and torch.equal(single.g_idx, whole.g_idx[2])


def test_internal_pieces_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The solver and the factorization go through experts in pieces sized by ``WORKSPACE_BYTES`` (on
    a CPU, more with more threads), and wide experts (``SOLO_ROWS``) one at a time; pieces of one
    expert change no bit of the float32 result."""
    W, H = expert_stack(experts=5)
    schemes = [
        Scheme(bits=4, group_size=32, block_size=64),
        Scheme(bits=4, act_order=True, static_groups=False, block_size=32),
    ]
    small_workspace = {
        "WORKSPACE_BYTES": 4096,
        "WORKSPACE_BYTES_PER_THREAD": 4096,
        "MAX_WORKSPACE_BYTES": 4096,
    }
    for scheme, patched in itertools.product(schemes, [small_workspace, {"SOLO_ROWS": W.shape[1]}]):
        whole = gptq_quantize(W.float(), H.float(), scheme)
        with monkeypatch.context() as patch:
            for name, value in patched.items():
                patch.setattr(gptq, name, value)
            assert gptq._experts_per_piece(W.shape[0], 64, W.shape[1], W) == 1
            pieces = gptq_quantize(W.float(), H.float(), scheme)
        assert torch.equal(pieces.codes, whole.codes) and torch.equal(pieces.scale, whole.scale)
        assert torch.equal(pieces.zero, whole.zero)
        assert (pieces.g_idx is None) == (whole.g_idx is None)
        assert whole.g_idx is None or torch.equal(pieces.g_idx, whole.g_idx)


def test_hessian_is_kept_unless_it_may_be_overwritten() -> None:
    """By default the caller's Hessians come back as they went in; with ``overwrite_hessian`` the
    solver keeps its factor in their memory, with the very same result."""
    W, H = expert_stack(experts=3)
    H = H.float()
    kept = H.clone()
    for scheme in (Scheme(bits=4, group_size=32, block_size=32), Scheme(bits=4, act_order=False)):
        plain = gptq_quantize(W.float(), H, scheme, max_experts_per_chunk=2)
        assert torch.equal(H, kept)
        scratch = H.clone()
        reused = gptq_quantize(W.float(), scratch, scheme, max_experts_per_chunk=2, overwrite_hessian=True)
        assert not torch.equal(scratch, kept)  # the factor took its place
        assert torch.equal(reused.codes, plain.codes) and torch.equal(reused.scale, plain.scale)
        assert torch.equal(reused.zero, plain.zero)
        single = H[0].clone()  # a dense Linear's [in, in] Hessian, too
        alone = gptq_quantize(W[0].float(), single, scheme, overwrite_hessian=True)
        assert not torch.equal(single, kept[0]) and torch.equal(alone.codes, plain.codes[0])


def test_deterministic() -> None:
    W, H = expert_stack()
    scheme = Scheme(bits=4, group_size=32, act_order=True, static_groups=False, block_size=64)
    first = gptq_quantize(W.float(), H.float(), scheme)
    second = gptq_quantize(W.float(), H.float(), scheme)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scale, second.scale)


@pytest.mark.parametrize(
    "scheme",
    [
        Scheme(bits=4, group_size=32),
        Scheme(bits=4, group_size=-1, sym=False),
        Scheme(bits=4, act_order=True, static_groups=False),
    ],
    ids=lambda s: s.label + ("-act" if s.act_order else ""),
)
def test_gptq_beats_rtn_on_correlated_routed_inputs(scheme: Scheme) -> None:
    gen = torch.Generator().manual_seed(1)
    experts, out, columns, tokens = 4, 32, 64, 1024
    x = correlated_inputs(tokens, columns, gen)
    routing = top_k_routing(tokens, experts, 2, gen)
    accumulator = HessianAccumulator(columns, experts, chunk_size=128)
    accumulator.add(x, routing)
    H, _ = accumulator.finalize(min_tokens=0)
    W = torch.randn(experts, out, columns, generator=gen)
    gptq = gptq_quantize(W, H, scheme).dequantize()
    rtn = rtn_quantize(W, scheme).dequantize()
    for expert in range(experts):
        x_e = x[(routing == expert).any(-1)]
        gptq_error = torch.linalg.norm((W[expert] - gptq[expert]) @ x_e.T)
        rtn_error = torch.linalg.norm((W[expert] - rtn[expert]) @ x_e.T)
        assert gptq_error < 0.9 * rtn_error, (expert, float(gptq_error), float(rtn_error))


@pytest.mark.parametrize(
    "scheme",
    [
        Scheme(bits=4, group_size=32),
        Scheme(bits=8, group_size=-1, sym=False),
        Scheme(bits=4, act_order=True, static_groups=False),
    ],
    ids=lambda s: s.label + ("-act" if s.act_order else ""),
)
@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
def test_identity_hessian_gives_round_to_nearest(scheme: Scheme, scale_dtype: torch.dtype | None) -> None:
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(3, 24, 160, generator=gen)
    H = torch.eye(160).expand(3, -1, -1)
    gptq = gptq_quantize(W, H, scheme, scale_dtype=scale_dtype)
    rtn = rtn_quantize(W, scheme, scale_dtype=scale_dtype)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scale, rtn.scale) and torch.equal(gptq.zero, rtn.zero)
    if scheme.group_index:  # all diagonals tie, so the stable order is the identity
        assert torch.equal(gptq.g_idx, rtn.group_index().expand(3, -1))
    else:
        assert gptq.g_idx is None


def test_dead_inputs_and_empty_hessian() -> None:
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(2, 8, 64, generator=gen)
    x = correlated_inputs(256, 64, gen)
    x[:, 10:20] = 0
    H = torch.stack([hessian_of(x).float(), torch.zeros(64, 64)])
    for scheme in (
        Scheme(bits=4, group_size=32),
        Scheme(bits=4, group_size=-1, act_order=True, static_groups=False),
    ):
        got = gptq_quantize(W, H, scheme).dequantize()
        assert got.isfinite().all()
        assert torch.equal(got[0][:, 10:20], torch.zeros(8, 10))
        assert torch.equal(got[1], torch.zeros(8, 64)), "no live input: the reference zeroes every column"


def test_failed_cholesky_retries_with_more_damping_for_that_expert_only(factor_path: str) -> None:
    W, H = expert_stack()
    W, H = W.float(), H.float()
    gen = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(96, 96, generator=gen))
    eigenvalues = torch.ones(96)
    eigenvalues[0] = -0.05  # 1% damping leaves it indefinite, 10% does not
    H[2] = basis @ torch.diag(eigenvalues) @ basis.T
    scheme = Scheme(bits=4, group_size=32, damp=0.01)
    got = gptq_quantize(W, H, scheme)
    assert got.dequantize().isfinite().all()
    healthy = gptq_quantize(W[:2], H[:2], scheme)
    assert torch.equal(got.codes[:2], healthy.codes)
    retried = gptq_quantize(W[2], H[2], replace(scheme, damp=0.1))
    assert torch.equal(got.codes[2], retried.codes)


@pytest.mark.parametrize(
    ("columns", "block", "panel"), [(200, 64, 64), (200, 32, 96), (200, 64, 256), (1, 64, 64)]
)
def test_feedback_factor_is_the_one_formed_from_w(columns: int, block: int, panel: int) -> None:
    """``G`` from the reduced rows alone equals ``G`` formed block by block from ``W``, the reversed
    Cholesky factor (``W^T W = A``): ``G[b, b] = W[b, b]^-1``, ``G[b, :b] = W[b, b]^-1 W[b, :b]``, with
    rows reduced a block or a panel of blocks at a time; 200 columns leave a partial last block."""
    gen = torch.Generator().manual_seed(10)
    x = correlated_inputs(3 * 2 * columns, columns, gen).double().reshape(3, 2 * columns, columns)
    A = x.mT @ x + 0.1 * torch.eye(columns, dtype=x.dtype)
    G = torch.full_like(A, float("nan"))  # every entry must be written
    info = gptq._feedback_factor_(A.clone(), block, panel, out=G)
    assert torch.equal(info, torch.zeros(3, dtype=torch.int32))
    assert torch.equal(G, G.tril())
    W = torch.linalg.cholesky(A.flip(-2, -1)).flip(-2, -1).mT  # unique up to signs: none here
    torch.testing.assert_close(W.mT @ W, A, rtol=1e-10, atol=1e-10 * A.abs().max().item())
    expected = torch.zeros_like(W)
    for start in range(0, columns, block):
        rows = slice(start, start + block)
        inverse = torch.linalg.inv(W[:, rows, rows])
        expected[:, rows, rows] = inverse
        expected[:, rows, :start] = inverse @ W[:, rows, :start]
    torch.testing.assert_close(G, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())


@pytest.mark.parametrize("panel", [64, 128])
def test_feedback_factor_reports_a_failure_in_any_block(panel: int) -> None:
    A = torch.eye(200, dtype=torch.float64).repeat(3, 1, 1)
    A[1, 3, 3] = -1.0  # in the first block, the last one factored
    A[2, 190, 190] = -1.0  # in the last block, the first one factored
    info = gptq._feedback_factor_(A, 64, panel, out=torch.empty_like(A))
    assert info[0] == 0 and info[1] != 0 and info[2] != 0


def test_panels_are_whole_blocks_of_about_an_eighth() -> None:
    assert gptq._panel_rows(768, 128) == 128  # never less than a block
    assert gptq._panel_rows(2048, 128) == 256
    assert gptq._panel_rows(14336, 128) == gptq.FACTOR_PANEL_MAX
    assert gptq._panel_rows(2048, 96) == 192


def test_hopeless_hessian_falls_back_to_round_to_nearest(factor_path: str) -> None:
    W = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(6))
    H = torch.stack([torch.eye(32), -torch.eye(32)])
    scheme = Scheme(bits=4, group_size=32)
    assert torch.equal(gptq_quantize(W, H, scheme).codes, rtn_quantize(W, scheme).codes)


def test_non_finite_input_is_refused() -> None:
    W, H = torch.randn(1, 8, 32), torch.eye(32)[None].clone()
    H[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(W, H, Scheme())
    with pytest.raises(ValueError, match=r"\[E, out, in\]"):
        gptq_quantize(W, torch.eye(16)[None], Scheme())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_solve_agrees_with_cpu() -> None:
    W, H = expert_stack(seed=11)
    scheme = Scheme(bits=4, group_size=32, act_order=True, static_groups=False, block_size=64)
    cpu = gptq_quantize(W.float(), H.float(), scheme)
    cuda = gptq_quantize(W.float().cuda(), H.float().cuda(), scheme)
    assert cuda.codes.is_cuda and cuda.dequantize().isfinite().all()
    assert torch.equal(cuda.g_idx.cpu(), cpu.g_idx)
    assert (cuda.codes.cpu() == cpu.codes).float().mean() > 0.99


# -- Hessian accumulation ---------------------------------------------------------------------------


def routed_inputs(tokens=700, columns=48, experts=5, k=2, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return correlated_inputs(tokens, columns, gen), top_k_routing(tokens, experts, k, gen)


def test_routed_accumulation_equals_explicit_per_expert_products() -> None:
    x, routing = routed_inputs()
    accumulator = HessianAccumulator(48, 5, chunk_size=64)
    accumulator.add(x, routing)
    H, counts = accumulator.finalize(min_tokens=0)
    assert H.dtype == torch.float32 and counts.dtype == torch.int64
    for expert in range(5):
        x_e = x[(routing == expert).any(-1)]
        assert counts[expert] == x_e.shape[0]
        torch.testing.assert_close(H[expert].double(), hessian_of(x_e), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(accumulator.layer_hessian().double(), hessian_of(x), rtol=1e-5, atol=1e-3)


def test_float32_sums_of_many_chunks_stay_close_to_float64() -> None:
    """The running sums are float32: hundreds of chunk products added in float32 stay within 1e-5 of
    the mean diagonal of float64 sums of the same rows, far below GPTQ's 1% damping."""
    x, routing = routed_inputs(tokens=6000)
    sums = {}
    for dtype in (torch.float64, torch.float32):
        accumulator = HessianAccumulator(48, 5, chunk_size=8, dtype=dtype)
        accumulator.add(x, routing)
        assert accumulator.sums().dtype == dtype
        sums[dtype] = accumulator.finalize(min_tokens=0)[0]
    assert HessianAccumulator(48, 5).dtype == torch.float32
    assert not torch.equal(sums[torch.float32], sums[torch.float64])
    scale = sums[torch.float64].diagonal(dim1=-2, dim2=-1).mean()
    assert (sums[torch.float32].double() - sums[torch.float64].double()).abs().max() < 1e-5 * scale


def test_in_place_finalize_gives_the_same_bits_and_spends_only_its_experts() -> None:
    """Hessians written over their own sums, a chunk of experts at a time as the pipeline asks for them,
    equal the out-of-place ones bit for bit (starved experts with pseudo-rows included); the spent
    experts' sums cannot be read again, the others still can."""
    x, routing = routed_inputs()

    def filled() -> HessianAccumulator:
        accumulator = HessianAccumulator(48, 5, chunk_size=64)
        accumulator.add(x, routing)
        return accumulator

    min_tokens = int(filled().counts.max())  # every expert but the busiest is topped up
    expected = filled().finalize(min_tokens=min_tokens)[0]
    accumulator = filled()
    layer_mean = accumulator._layer_mean()
    sums = accumulator.sums()
    first, _ = accumulator.finalize_with(min_tokens, layer_mean, experts=range(0, 3), in_place=True)
    assert first.data_ptr() == sums.data_ptr() and torch.equal(first, expected[:3])
    with pytest.raises(RuntimeError, match="finalized in place"):
        accumulator.finalize_with(min_tokens, layer_mean, experts=range(2, 4))
    with pytest.raises(RuntimeError, match="finalized in place"):
        accumulator.sums()
    rest, _ = accumulator.finalize_with(min_tokens, layer_mean, experts=range(3, 5), in_place=True)
    assert torch.equal(rest, expected[3:])
    with pytest.raises(ValueError, match="in_place"):
        filled().finalize(0, dtype=torch.float64, in_place=True)


def test_mask_indices_per_expert_rows_and_batch_shape_agree_bitwise() -> None:
    x, routing = routed_inputs()
    by_index = HessianAccumulator(48, 5, chunk_size=64)
    by_index.add(x, routing)
    mask = torch.zeros(700, 5, dtype=torch.bool).scatter_(1, routing, True)
    by_mask = HessianAccumulator(48, 5, chunk_size=64)
    by_mask.add(x.reshape(7, 100, 48), mask.reshape(7, 100, 5))
    per_expert = HessianAccumulator(48, 5, chunk_size=64)
    per_expert.add_per_expert([x[mask[:, e]] for e in range(5)])
    reference = by_index.finalize(min_tokens=0)[0]
    assert torch.equal(by_mask.finalize(min_tokens=0)[0], reference)
    assert torch.equal(per_expert.finalize(min_tokens=0)[0], reference)
    assert _layer_mean(by_index, min_tokens=int(by_index.counts.min())) is None  # no expert is starved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_sums_are_the_held_sums_bit_for_bit(dtype: torch.dtype) -> None:
    """Kept inputs summed a few experts at a time, in uneven batches, give exactly the running sums,
    the layer-wide prior summed in expert order, and the finalized Hessians of starved experts."""
    x, routing = routed_inputs(tokens=900, experts=7)
    x = x.to(dtype)
    routing[routing == 6] = 5  # expert 6 gets no row at all
    held = HessianAccumulator(48, 7, chunk_size=64)
    replayed = ReplayedAccumulator(48, 7, chunk_size=64, experts_per_replay=3)
    for rows, experts in zip(x.split([100, 333, 1, 466]), routing.split([100, 333, 1, 466]), strict=True):
        held.add(rows, experts)
        replayed.add(rows, experts)
    assert replayed.stored_bytes == x.nbytes + 900 * 7
    assert torch.equal(replayed.counts, held.counts) and replayed.counts[6] == 0
    sums = held.sums()
    replayed_sums = list(replayed.iter_sums())
    assert len(replayed_sums) == 7 and all(
        torch.equal(a, b) for a, b in zip(replayed_sums, sums, strict=True)
    )
    prior = held._layer_mean()
    assert prior is not None
    assert torch.equal(_layer_mean(replayed, min_tokens=0), prior)  # expert 6 is starved at any minimum
    assert torch.equal(_layer_mean(held, min_tokens=0), prior)
    for experts in (range(0, 7), range(2, 5), range(6, 7)):
        expected = held.finalize_with(400, prior, experts=experts)[0]
        assert torch.equal(replayed.finalize_with(400, prior, experts=experts)[0], expected)
        in_place = replayed.finalize_with(400, prior, experts=experts, in_place=True)[0]
        assert torch.equal(in_place, expected)  # and the kept inputs can form them again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sums_are_float32_products_of_the_rows_as_they_arrive(dtype: torch.dtype) -> None:
    """bf16 rows are multiplied on the CPU's bf16 units where it has them, float32 rows in float32: either
    way the sums are those of the rows' own values to float32 accuracy (a bf16 rounding of float32 rows
    would be 1000x off), over several bands of columns and a partial last chunk (padded with zero rows
    on the bf16 units), and float32 matmuls after are full float32."""
    gen = torch.Generator().manual_seed(3)
    x = correlated_inputs(1573, 640, gen).to(dtype)
    precision = torch.backends.mkldnn.matmul.fp32_precision
    accumulator = HessianAccumulator(640, 2, chunk_size=512)
    accumulator.add(x, torch.tensor([[0, 1]]).expand(1573, 2))
    sums = accumulator.sums()
    assert torch.backends.mkldnn.matmul.fp32_precision == precision
    reference = x.double().T @ x.double()
    error = (sums.double() - reference).abs().max() / reference.diagonal().mean()
    assert error < 1e-5  # float32 products: 3e-7-5e-7 here; rows rounded to bf16: 5e-4
    assert torch.equal(sums[0], sums[1])
    a, b = torch.randn(64, 640, generator=gen), torch.randn(640, 64, generator=gen)
    assert ((a @ b).double() - a.double() @ b.double()).abs().max() < 1e-4


def test_dense_linear_takes_every_token() -> None:
    x, _ = routed_inputs()
    accumulator = HessianAccumulator(48, chunk_size=64)
    accumulator.add(x)
    H, counts = accumulator.finalize(min_tokens=0)
    assert H.shape == (1, 48, 48) and counts.tolist() == [700]
    torch.testing.assert_close(H[0].double(), hessian_of(x), rtol=1e-5, atol=1e-3)


def test_waiting_rows_do_not_hold_their_batch() -> None:
    """An expert that receives a few rows per batch waits many batches for a full chunk: what it holds
    meanwhile is its own rows, not the batch they were gathered from (that would keep every batch of
    the calibration set in memory), and its sums are the same as from one batch of all the rows."""
    tokens, width = 256, 64
    acc, whole = HessianAccumulator(width, 3, chunk_size=128), HessianAccumulator(width, 3, chunk_size=128)
    xs, routes = [], []
    for batch in range(8):
        x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(batch))
        route = torch.zeros(tokens, 2, dtype=torch.long)
        route[:, 1] = 1
        route[:3, 1] = 2  # expert 2: three rows per batch, a full chunk only after many batches
        acc.add(x, route)
        xs.append(x)
        routes.append(route)
        held = sum(piece.untyped_storage().nbytes() for piece in acc._pending[2])
        assert held == 3 * (batch + 1) * width * 4
    whole.add(torch.cat(xs), torch.cat(routes))
    assert torch.equal(acc.finalize(0)[0], whole.finalize(0)[0])


def test_accumulation_is_deterministic_and_independent_of_batching() -> None:
    x, routing = routed_inputs()

    def run(splits: list[int], chunk_size: int = 64) -> torch.Tensor:
        accumulator = HessianAccumulator(48, 5, chunk_size=chunk_size)
        for part, part_routing in zip(x.split(splits), routing.split(splits), strict=True):
            accumulator.add(part, part_routing)
        return accumulator.finalize(min_tokens=100)[0]

    once = run([700])
    assert torch.equal(once, run([700]))
    assert torch.equal(once, run([1, 99, 300, 17, 283])), "chunks follow each expert's rows, not the batches"
    torch.testing.assert_close(once, run([700], chunk_size=50), rtol=1e-6, atol=1e-5)


def assert_symmetric_positive_definite(H: torch.Tensor) -> None:
    assert H.isfinite().all()
    assert torch.equal(H, H.mT)
    assert (torch.linalg.eigvalsh(H.double()) > 0).all()


def test_starved_experts_borrow_layer_statistics() -> None:
    x, routing = routed_inputs(experts=4)
    routing[routing == 2] = 0  # expert 2: no tokens
    routing[routing == 3] = 1
    routing[0, 1] = 3  # expert 3: one token
    accumulator = HessianAccumulator(48, 4, chunk_size=64)
    accumulator.add(x, routing)
    H, counts = accumulator.finalize(min_tokens=64)
    assert counts[2] == 0 and counts[3] == 1 and counts[:2].min() >= 64
    assert_symmetric_positive_definite(H)
    layer = accumulator.layer_hessian().double()
    torch.testing.assert_close(H[2].double(), layer, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(H[3].double(), (hessian_of(x[:1]) + 63 * layer) / 64, rtol=1e-6, atol=1e-4)
    for expert in range(2):  # enough tokens: exactly the reference Hessian
        torch.testing.assert_close(
            H[expert].double(), hessian_of(x[(routing == expert).any(-1)]), rtol=1e-5, atol=1e-3
        )
    W = torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(8))
    assert (
        gptq_quantize(W, H, Scheme(bits=4, group_size=16, act_order=True, static_groups=False))
        .dequantize()
        .isfinite()
        .all()
    )


def test_finalize_is_the_plain_expression_bit_for_bit() -> None:
    """``sym(2 (S_e + m_e S_all / n_all) / (n_e + m_e))`` written out, against ``finalize`` at a width of
    several symmetrization tiles and a ragged last one: ``sym`` takes the tiles above the diagonal as
    they are and mirrors them, and makes each diagonal tile ``d`` into ``(d + d^T) / 2``."""
    features = 300
    x, routing = routed_inputs(tokens=400, columns=features, experts=3)
    routing[routing == 2] = 0
    routing[0, 1] = 2  # expert 2: one token, topped up from the layer
    accumulator = HessianAccumulator(features, 3, chunk_size=64)
    accumulator.add(x, routing)
    sums = accumulator.sums()  # the running sums themselves, made asymmetric in both kinds of tile
    sums[:, 5, 290] += torch.tensor([0.5, -0.25, 3.0], dtype=sums.dtype)  # above the diagonal tiles
    sums[:, 7, 3] += torch.tensor([0.5, -0.25, 3.0], dtype=sums.dtype)  # in a diagonal tile
    sums[:, 290, 5] = float("nan")  # below them: never read
    H, counts = accumulator.finalize(min_tokens=64)
    layer_mean = (sums[0] + sums[1] + sums[2]) / counts.sum().item()
    tile = torch.arange(features) // SYMMETRIZE_TILE
    above, below = tile[:, None] < tile[None, :], tile[:, None] > tile[None, :]
    for expert in range(3):
        rows = int(counts[expert])
        pseudo = max(64 - rows, 0)
        plain = (layer_mean * pseudo + sums[expert]) * (2.0 / (rows + pseudo))
        expected = torch.where(above, plain, torch.where(below, plain.T, (plain + plain.T) / 2))
        assert torch.equal(H[expert], expected.float()), expert
        assert H[expert, 5, 290] == H[expert, 290, 5] and H[expert, 7, 3] == H[expert, 3, 7]
    assert counts[2] == 1


def test_sums_hold_the_whole_product_once_mirrored() -> None:
    """Each chunk product forms only the upper block triangle of its sums: the lower one comes from it in
    :meth:`sums`, never from what fresh memory held, and finalize never reads it."""
    features = 2 * SYMMETRIZE_TILE + 40
    x, routing = routed_inputs(tokens=300, columns=features, experts=2)

    def accumulated(fill: float) -> HessianAccumulator:
        accumulator = HessianAccumulator(features, 2, chunk_size=64)
        accumulator._sums = torch.full((2, features, features), fill)  # what its memory held before
        accumulator.add(x, routing)
        return accumulator

    H, _ = accumulated(float("nan")).finalize(min_tokens=0)
    assert torch.equal(H, accumulated(0.0).finalize(min_tokens=0)[0])
    assert torch.isfinite(H).all() and torch.equal(H, H.mT)
    sums = accumulated(float("nan")).sums()
    for expert in range(2):
        rows = x[(routing == expert).any(-1)].double()
        exact = rows.T @ rows
        torch.testing.assert_close(sums[expert].double(), exact, rtol=0, atol=1e-6 * exact.abs().max().item())


def test_zero_token_expert_is_well_posed_even_without_min_tokens() -> None:
    x, routing = routed_inputs(experts=3)
    routing[routing == 2] = 0
    accumulator = HessianAccumulator(48, 3, chunk_size=64)
    accumulator.add(x, routing)
    H, counts = accumulator.finalize(min_tokens=0)
    assert counts[2] == 0
    assert_symmetric_positive_definite(H)
    torch.testing.assert_close(H[2].double(), accumulator.layer_hessian().double(), rtol=1e-6, atol=1e-4)


def test_no_data_at_all_gives_identity_and_round_to_nearest() -> None:
    accumulator = HessianAccumulator(32, 3)
    accumulator.add(torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long))
    accumulator.add_expert(1, torch.zeros(0, 32))
    H, counts = accumulator.finalize(min_tokens=16)
    assert counts.tolist() == [0, 0, 0] and accumulator.layer_hessian() is None
    assert torch.equal(H, torch.eye(32).expand(3, -1, -1))
    W = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(9))
    scheme = Scheme(bits=4, group_size=16)
    assert torch.equal(gptq_quantize(W, H, scheme).codes, rtn_quantize(W, scheme).codes)


def test_feature_never_seen_gives_dead_column() -> None:
    x, routing = routed_inputs(experts=2, k=1)
    x[:, 7] = 0
    accumulator = HessianAccumulator(48, 2, chunk_size=64)
    accumulator.add(x, routing)
    H, _ = accumulator.finalize(min_tokens=64)
    assert H[:, 7].abs().sum() == 0
    W = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(10))
    got = gptq_quantize(W, H, Scheme(bits=4, group_size=16)).dequantize()
    assert got.isfinite().all() and torch.equal(got[:, :, 7], torch.zeros(2, 16))


def test_bad_routing_is_refused() -> None:
    accumulator = HessianAccumulator(8, 2)
    with pytest.raises(ValueError, match="expert indices"):
        accumulator.add(torch.randn(4, 8), torch.full((4, 1), 2))
    with pytest.raises(ValueError, match="routing mask"):
        accumulator.add(torch.randn(4, 8), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        accumulator.add(torch.randn(4, 9))
