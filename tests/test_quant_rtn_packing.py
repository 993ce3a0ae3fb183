"""Round-to-nearest quantization and the GPTQ / compressed-tensors bit layouts.

The GPTQ layout is checked against an independent word-by-word oracle written the way AutoGPTQ's
``QuantLinear.pack`` builds its words; the compressed-tensors layout against the library itself.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moeconvert.quant.packing import (
    pack_compressed,
    pack_gptq,
    pack_int32,
    unpack_compressed,
    unpack_gptq,
    unpack_int32,
)
from moeconvert.quant.rtn import QuantizedWeight, compute_qparams, dequantize, quantize_codes, rtn_quantize
from moeconvert.quant.scheme import Scheme

GRID = list(itertools.product((4, 8), (True, False), (32, 128, -1)))


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _int32(word: int) -> int:
    """An unsigned 32-bit word as the int32 value it is stored as."""
    return word - 2**32 if word >= 2**31 else word


def _with_g_idx(qw: QuantizedWeight, g_idx: torch.Tensor | None) -> QuantizedWeight:
    return QuantizedWeight(qw.codes, qw.scale, qw.zero, qw.bits, qw.group_size, qw.sym, g_idx)


def _act_order_index(in_features: int, size: int, seed: int) -> torch.Tensor:
    """A group map as act-order produces it: groups of ``size`` over a random column permutation."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // size).to(torch.int32)
    return g_idx


# ---------------------------------------------------------------- int32 words


def test_pack_int32_hand_computed_words() -> None:
    nibbles = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    assert pack_int32(nibbles, 4).tolist() == [[0x76543210]]
    assert pack_int32(torch.full((1, 8), 15, dtype=torch.uint8), 4).tolist() == [[-1]]
    assert pack_int32(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x321]]  # zero padded
    assert pack_int32(torch.tensor([[1, 2, 3, 255]], dtype=torch.uint8), 8).tolist() == [[_int32(0xFF030201)]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 37), (1, 1)])
def test_pack_int32_round_trip(bits: int, shape: tuple[int, ...]) -> None:
    values = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape[-1] == -(-shape[-1] * bits // 32)
    assert torch.equal(unpack_int32(packed, bits, shape[-1]), values)


def test_pack_int32_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="in \\[0, 15\\]"):
        pack_int32(torch.tensor([[16]]), 4)


# ---------------------------------------------------------------- RTN grid


def test_symmetric_hand_example() -> None:
    w = torch.tensor([[-1.875, 0.5, 0.0, 1.875]])  # scale 2 * 1.875 / 15 = 0.25 exactly
    scale, zero = compute_qparams(w, Scheme(bits=4, sym=True))
    assert scale.shape == zero.shape == (1, 1) and scale.dtype == zero.dtype == torch.float32
    assert scale.item() == 0.25 and zero.item() == 8
    # -7.5 rounds half-to-even to -8 -> 0; 2 -> 10; 7.5 -> 8 -> 16, clamped to 15
    assert quantize_codes(w, scale, zero, 15).tolist() == [[0, 10, 8, 15]]


def test_asymmetric_range_includes_zero() -> None:
    scheme = Scheme(bits=4, sym=False)
    w = torch.tensor([[0.625, 1.5, 2.5, 3.75], [-3.75, -3.75, -3.75, -3.75]])
    scale, zero = compute_qparams(w, scheme)
    assert scale[:, 0].tolist() == [0.25, 0.25]  # ranges [0, 3.75] and [-3.75, 0]
    assert zero[:, 0].tolist() == [0, 15]
    codes = quantize_codes(w, scale, zero, 15)
    assert codes.tolist() == [[2, 6, 10, 15], [0, 0, 0, 0]]  # 2.5 rounds half-to-even to 2
    assert torch.equal(dequantize(codes, scale, zero)[1], w[1])


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [None, torch.float16, torch.bfloat16])
def test_zero_constant_and_tiny_rows_stay_finite(sym: bool, scale_dtype: torch.dtype | None) -> None:
    w = torch.tensor([[0.0] * 8, [2.5] * 8, [-2.5] * 8, [1e-30] * 8, [-1e-42] * 8])
    qw = rtn_quantize(w, Scheme(bits=4, group_size=-1, sym=sym), scale_dtype=scale_dtype)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert qw.zero[0].item() == 8  # the all-zero row takes the reference's [-1, 1] fallback
    assert qw.scale[0].item() == pytest.approx(2 / 15, rel=1e-2)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.equal(deq[0], torch.zeros(8))
    assert ((w - deq).abs() <= qw.scale / 2 * (1 + 1e-6)).all()
    if scale_dtype is not None:
        assert torch.equal(qw.scale.to(scale_dtype).float(), qw.scale)


@pytest.mark.parametrize(("bits", "sym", "group_size"), GRID)
@pytest.mark.parametrize("scale_dtype", [None, torch.float16, torch.bfloat16])
def test_error_within_half_a_step(
    bits: int, sym: bool, group_size: int, scale_dtype: torch.dtype | None
) -> None:
    w = _weight(24, 256) * 0.05
    w[3] = w[3].abs()  # an all-positive row
    qw = rtn_quantize(w, Scheme(bits=bits, group_size=group_size, sym=sym), scale_dtype=scale_dtype)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    assert qw.scale.dtype == torch.float32 and qw.zero.dtype == torch.int32
    assert qw.scale.shape == (24, Scheme(group_size=group_size).groups(256))
    if sym:
        assert (qw.zero == 2 ** (bits - 1)).all()
    else:
        assert qw.zero[3].eq(0).all()
    per_column = qw.scale.repeat_interleave(qw.effective_group_size, dim=-1)
    # half a step, plus float32 rounding of w / scale at the clamped edge of a symmetric grid
    slack = 4 * torch.finfo(torch.float32).eps * w.abs()
    assert ((w - qw.dequantize()).abs() <= per_column / 2 + slack).all()


def test_last_partial_group_is_its_own_group() -> None:
    w = _weight(16, 200)
    scheme = Scheme(bits=4, group_size=128, sym=False)
    qw = rtn_quantize(w, scheme)
    head = rtn_quantize(w[:, :128], scheme)
    tail = rtn_quantize(w[:, 128:], Scheme(bits=4, group_size=-1, sym=False))
    assert qw.scale.shape == (16, 2)
    assert torch.equal(qw.codes, torch.cat([head.codes, tail.codes], dim=1))
    assert torch.equal(qw.scale, torch.cat([head.scale, tail.scale], dim=1))
    assert torch.equal(qw.zero, torch.cat([head.zero, tail.zero], dim=1))


def test_group_minus_one_is_one_group_per_row() -> None:
    w = _weight(8, 96)
    qw = rtn_quantize(w, Scheme(bits=8, group_size=-1))
    assert qw.scale.shape == (8, 1) and qw.n_groups == 1
    same = rtn_quantize(w, Scheme(bits=8, group_size=96))
    assert torch.equal(qw.codes, same.codes) and torch.equal(qw.scale, same.scale)
    assert torch.allclose(qw.scale[:, 0], 2 * w.abs().amax(dim=1) / 255)


@pytest.mark.parametrize(("bits", "sym", "group_size"), GRID)
def test_batched_equals_loop_over_experts(bits: int, sym: bool, group_size: int) -> None:
    w = _weight(3, 16, 160)
    scheme = Scheme(bits=bits, group_size=group_size, sym=sym)
    batched = rtn_quantize(w, scheme, scale_dtype=torch.float16)
    for e in range(3):
        single = rtn_quantize(w[e], scheme, scale_dtype=torch.float16)
        for field in ("codes", "scale", "zero"):
            assert torch.equal(getattr(batched, field)[e], getattr(single, field))
        assert torch.equal(batched.dequantize()[e], single.dequantize())


def test_dequantize_with_act_order_index() -> None:
    qw = rtn_quantize(_weight(2, 8, 64), Scheme(bits=4, group_size=16, sym=False))
    g_idx = _act_order_index(64, 16, seed=3)
    permuted = _with_g_idx(qw, g_idx)
    column_scale = qw.scale[..., g_idx.long()]
    column_zero = qw.zero[..., g_idx.long()]
    expected = (qw.codes.float() - column_zero.float()) * column_scale
    assert torch.equal(permuted.dequantize(), expected)
    per_expert = _with_g_idx(qw, torch.stack([g_idx, _act_order_index(64, 16, seed=4)]))
    assert torch.equal(per_expert.dequantize()[0], expected[0])


def test_rtn_refuses_non_finite_weights() -> None:
    w = _weight(4, 32)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rtn_quantize(w, Scheme(bits=4, group_size=32))


# ---------------------------------------------------------------- GPTQ v1


def _oracle_gptq(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """GPTQ v1 words built one field at a time, the way AutoGPTQ's QuantLinear.pack writes them."""
    bits, per_word = qw.bits, 32 // qw.bits
    intweight = qw.codes.numpy().T.astype(np.uint32)  # [in, out]
    qweight = np.zeros((intweight.shape[0] // per_word, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per_word):
            qweight[row] |= intweight[row * per_word + j] << np.uint32(bits * j)
    zeros = (qw.zero.numpy().T - 1).astype(np.uint32)  # [groups, out]
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // per_word), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per_word):
            qzeros[:, col] |= zeros[:, col * per_word + j] << np.uint32(bits * j)
    return {"qweight": qweight.astype(np.int32), "qzeros": qzeros.astype(np.int32)}


def _oracle_gptq_dequantize(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """What a v1 reader computes: ``scales[g_idx] * (q - (stored_zero + 1)[g_idx])``, as [out, in]."""
    per_word, mask = 32 // bits, 2**bits - 1
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    q = (tensors["qweight"].unsqueeze(1) >> shifts[None, :, None]) & mask
    q = q.reshape(-1, tensors["qweight"].shape[1])  # [in, out]
    zeros = ((tensors["qzeros"].unsqueeze(2) >> shifts) & mask).reshape(tensors["scales"].shape) + 1
    g = tensors["g_idx"].long()
    return (tensors["scales"].float()[g] * (q - zeros[g]).float()).T


@pytest.mark.parametrize(("bits", "sym", "group_size"), GRID)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_reference_words_and_round_trips(
    bits: int, sym: bool, group_size: int, act_order: bool
) -> None:
    w = _weight(32, 256, seed=bits)
    qw = rtn_quantize(w, Scheme(bits=bits, group_size=group_size, sym=sym), scale_dtype=torch.float16)
    if act_order:
        qw = _with_g_idx(qw, _act_order_index(256, qw.effective_group_size, seed=5))
    tensors = pack_gptq(qw)
    per_word = 32 // bits
    assert tensors["qweight"].shape == (256 // per_word, 32) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (qw.n_groups, 32 // per_word) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (qw.n_groups, 32) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].shape == (256,) and tensors["g_idx"].dtype == torch.int32
    oracle = _oracle_gptq(qw)
    assert np.array_equal(tensors["qweight"].numpy(), oracle["qweight"])
    assert np.array_equal(tensors["qzeros"].numpy(), oracle["qzeros"])
    assert torch.equal(_oracle_gptq_dequantize(tensors, bits), qw.dequantize())

    back = unpack_gptq(tensors, bits)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale)
    assert back.group_size == qw.group_size and back.sym == sym
    permuted = act_order and group_size != -1  # one group has no order to permute
    assert (back.g_idx is None) == (not permuted)
    if permuted:
        assert torch.equal(back.g_idx, qw.g_idx)


def test_gptq_hand_computed_words() -> None:
    codes = torch.tensor([[(o + j) % 16 for j in range(8)] for o in range(8)], dtype=torch.uint8)
    qw = QuantizedWeight(
        codes=codes,
        scale=torch.full((8, 1), 0.5),
        zero=torch.full((8, 1), 8, dtype=torch.int32),
        bits=4,
        group_size=-1,
        sym=True,
    )
    tensors = pack_gptq(qw)
    expected = [_int32(sum(((o + j) % 16) << (4 * j) for j in range(8))) for o in range(8)]
    assert tensors["qweight"].tolist() == [expected]  # [in/8, out]: column o packs row o of the codes
    assert tensors["qzeros"].tolist() == [[0x77777777]]  # zero 8 stored as 7 in every nibble
    assert tensors["g_idx"].tolist() == [0] * 8
    eight = rtn_quantize(_weight(4, 4), Scheme(bits=8, group_size=-1))
    assert pack_gptq(eight)["qzeros"].tolist() == [[0x7F7F7F7F]]  # 128 stored as 127 in every byte


def test_gptq_partial_last_group_round_trips() -> None:
    qw = rtn_quantize(_weight(8, 136), Scheme(bits=4, group_size=128, sym=True), scale_dtype=torch.float16)
    tensors = pack_gptq(qw)
    assert tensors["scales"].shape == (2, 8) and tensors["g_idx"].tolist() == [0] * 128 + [1] * 8
    back = unpack_gptq(tensors, 4)
    assert back.group_size == 128 and back.g_idx is None and torch.equal(back.dequantize(), qw.dequantize())


def test_gptq_batched_equals_per_expert() -> None:
    qw = rtn_quantize(_weight(3, 16, 64), Scheme(bits=4, group_size=32, sym=True), scale_dtype=torch.float16)
    batched = pack_gptq(qw)
    for e in range(3):
        single = pack_gptq(QuantizedWeight(qw.codes[e], qw.scale[e], qw.zero[e], 4, 32, True))
        for name, tensor in single.items():
            assert torch.equal(batched[name][e], tensor), name
    back = unpack_gptq(batched, 4)
    assert torch.equal(back.codes, qw.codes) and back.g_idx is None


def test_gptq_per_expert_act_order_round_trips() -> None:
    qw = rtn_quantize(_weight(2, 8, 64), Scheme(bits=4, group_size=16, sym=True), scale_dtype=torch.float16)
    g_idx = torch.stack([_act_order_index(64, 16, seed=8), _act_order_index(64, 16, seed=9)])
    tensors = pack_gptq(_with_g_idx(qw, g_idx))
    assert torch.equal(tensors["g_idx"], g_idx)
    back = unpack_gptq(tensors, 4)
    assert back.group_size == 16 and torch.equal(back.g_idx, g_idx)
    assert torch.equal(back.dequantize(), _with_g_idx(qw, g_idx).dequantize())


def test_gptq_refuses_what_v1_cannot_hold() -> None:
    positive = rtn_quantize(_weight(8, 32).abs(), Scheme(bits=4, group_size=32, sym=False))
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq(positive)
    with pytest.raises(ValueError, match="does not divide"):
        pack_gptq(rtn_quantize(_weight(6, 32), Scheme(bits=4, group_size=32)))
    with pytest.raises(ValueError, match="float16"):
        pack_gptq(rtn_quantize(_weight(8, 32) * 1e-9, Scheme(bits=4, group_size=32)))


# ---------------------------------------------------------------- compressed-tensors


def _ct_scheme(bits: int, sym: bool, group_size: int):
    quantization = pytest.importorskip(
        "compressed_tensors.quantization", reason="compressed-tensors not installed"
    )
    args = quantization.QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
    )
    return quantization.QuantizationScheme(targets=["Linear"], weights=args)


def _ct_compressor():
    pack_quantized = pytest.importorskip(
        "compressed_tensors.compressors.pack_quantized", reason="compressed-tensors not installed"
    )
    return pack_quantized


@pytest.mark.parametrize(("bits", "sym", "group_size"), GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_library_decodes_our_tensors(
    bits: int, sym: bool, group_size: int, dtype: torch.dtype
) -> None:
    ct = _ct_compressor()
    w = _weight(36, 256, seed=bits).to(dtype)  # 36 rows: zero points do not fill their last word
    qw = rtn_quantize(w, Scheme(bits=bits, group_size=group_size, sym=sym), scale_dtype=dtype)
    tensors = pack_compressed(qw, dtype)
    assert tensors["weight_packed"].shape == (36, 256 * bits // 32)
    assert tensors["weight_scale"].dtype == dtype and tensors["weight_scale"].shape == (36, qw.n_groups)
    assert tensors["weight_shape"].dtype == torch.int64 and tensors["weight_shape"].tolist() == [36, 256]
    assert ("weight_zero_point" in tensors) == (not sym)
    if not sym:
        assert tensors["weight_zero_point"].shape == (-(-36 * bits // 32), qw.n_groups)

    decoded = ct.PackedQuantizationCompressor.decompress(dict(tensors), _ct_scheme(bits, sym, group_size))
    assert decoded["weight"].dtype == dtype
    assert torch.equal(decoded["weight"], qw.dequantize().to(dtype))
    assert torch.equal(unpack_compressed(tensors, bits, sym).dequantize(), qw.dequantize())


@pytest.mark.parametrize(("bits", "sym", "group_size"), GRID)
def test_compressed_tensors_library_packs_the_same_bytes(bits: int, sym: bool, group_size: int) -> None:
    ct = _ct_compressor()
    qw = rtn_quantize(_weight(36, 256, seed=7), Scheme(bits=bits, group_size=group_size, sym=sym))
    tensors = pack_compressed(qw, torch.float32)
    mid = 2 ** (bits - 1)
    signed_codes = (qw.codes.to(torch.int32) - mid).to(torch.int8)
    assert torch.equal(ct.pack_to_int32(signed_codes, bits), tensors["weight_packed"])
    assert torch.equal(
        ct.unpack_from_int32(tensors["weight_packed"], bits, torch.Size([36, 256])), signed_codes
    )
    signed_zero = (qw.zero - mid).to(torch.int8)
    if not sym:
        assert torch.equal(ct.pack_to_int32(signed_zero, bits, packed_dim=0), tensors["weight_zero_point"])

    # the library's own quantize-and-pack of our dequantized weight, with our scale and zero point
    state = {
        "weight": qw.dequantize(),
        "weight_scale": tensors["weight_scale"],
        "weight_zero_point": signed_zero,
    }
    compressed = ct.PackedQuantizationCompressor.compress(state, _ct_scheme(bits, sym, group_size))
    assert sorted(compressed) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(compressed[name], tensor), name


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_channel_with_ragged_input(bits: int) -> None:
    ct = _ct_compressor()
    qw = rtn_quantize(_weight(12, 100), Scheme(bits=bits, group_size=-1, sym=False))
    tensors = pack_compressed(qw, torch.float32)
    assert tensors["weight_packed"].shape == (12, -(-100 * bits // 32))
    decoded = ct.PackedQuantizationCompressor.decompress(dict(tensors), _ct_scheme(bits, False, -1))
    assert torch.equal(decoded["weight"], qw.dequantize())


def test_compressed_tensors_uses_pack_quantized_for_weight_only_int8() -> None:
    _ct_compressor()
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat

    for bits, group_size in itertools.product((4, 8), (128, -1)):
        scheme = _ct_scheme(bits, True, group_size)
        assert infer_module_format(torch.nn.Linear, scheme) == CompressionFormat.pack_quantized


@pytest.mark.parametrize(("bits", "sym", "group_size"), GRID)
def test_compressed_round_trip_and_batched(bits: int, sym: bool, group_size: int) -> None:
    qw = rtn_quantize(_weight(2, 16, 128), Scheme(bits=bits, group_size=group_size, sym=sym))
    tensors = pack_compressed(qw, torch.float32)
    back = unpack_compressed(tensors, bits, sym)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale) and back.n_groups == qw.n_groups
    for e in range(2):
        single = pack_compressed(
            QuantizedWeight(qw.codes[e], qw.scale[e], qw.zero[e], bits, group_size, sym), torch.float32
        )
        assert sorted(single) == sorted(tensors)
        for name, tensor in single.items():
            assert torch.equal(tensors[name][e], tensor), name


def test_compressed_refuses_what_the_library_cannot_load() -> None:
    partial = rtn_quantize(_weight(8, 200), Scheme(bits=4, group_size=128))
    with pytest.raises(ValueError, match="divisible"):
        pack_compressed(partial, torch.float32)
    qw = rtn_quantize(_weight(8, 64), Scheme(bits=4, group_size=16))
    with pytest.raises(ValueError, match="act-order"):
        pack_compressed(_with_g_idx(qw, _act_order_index(64, 16, seed=1)), torch.float32)
    assert pack_compressed(_with_g_idx(qw, qw.group_index()), torch.float32)["weight_packed"].shape == (8, 8)


def test_the_suggested_group_size_fits_every_width_and_kernels_take_it() -> None:
    from moeconvert.formats import get_format
    from moeconvert.formats.base import fitting_group_size

    compressed, gptq = get_format("compressed-tensors"), get_format("gptq")
    assert fitting_group_size(Scheme(group_size=128), [64, 96], compressed) == 32  # 64 fits one, not both
    assert fitting_group_size(Scheme(group_size=128), [2880, 2048], compressed) == 64  # GPT-OSS's width
    assert fitting_group_size(Scheme(group_size=64), [2880], compressed) == 32  # only below the one asked
    assert fitting_group_size(Scheme(group_size=128), [100], compressed) is None  # no served size divides it
    assert fitting_group_size(Scheme(group_size=128, sym=False), [96], gptq) is None  # not a width problem
