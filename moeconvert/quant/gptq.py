"""GPTQ (Frantar et al. 2022) for a whole stack of experts at once.

The solver follows the paper's algorithm with one leading expert dimension added to every tensor:
``W[E, out, in]`` and ``H[E, in, in]``. Dead inputs are dropped, the Hessian is damped and factored,
and columns are quantized one at a time, each rounding error fed back into the columns not yet
quantized, lazily in blocks. Every step is one tensor op over a chunk of experts; the Python loops are
over chunks, blocks and columns, as in the reference.

The solver needs two pieces of the upper Cholesky factor ``U`` of ``H^-1`` that the reference
takes from ``U`` itself: its diagonal blocks, for the column-by-column feedback inside a block, and
the feedback from all earlier blocks into a block, which the reference adds block by block as
``Err @ U[block, later]``. Both come from ``H``'s own factor without inverting ``H``: with
``H = V V^T`` (``V`` upper; ``V = J L J`` for the Cholesky factor ``L`` of ``J H J``, ``J`` the order
reversal), ``U = V^-1``, so ``U[b, b] = V[b, b]^-1``, and the feedback of everything before block ``b``
is ``R @ V[:b, b] @ U[b, b]`` with ``R = W - Q`` the residuals of the columns already quantized (the
identity behind QuIP's LDLQ, Chee et al. 2023). One Cholesky, ``in^3 / 3`` flops, and a product per
block replace the reference's ``4/3 in^3`` of Cholesky, inverse and second Cholesky, with the same
result in exact arithmetic.

For speed on CPUs the weights are held transposed (a column is a contiguous row), the feedback into
a block is one matmul when the block starts (left-looking: read the residuals, write one block),
inside a block each column updates only a few following columns at once and the rest of the block by
one matmul per sub-block, and every buffer is allocated once; see docs/PERFORMANCE.md, "GPTQ per
layer".

The integer grid (codes, scales, zero points) is :mod:`moeconvert.quant.rtn`'s, so a GPTQ result and a
round-to-nearest result are interchangeable for packing and output formats. Statistics are gathered in
:mod:`moeconvert.quant.hessian`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .rtn import QuantizedWeight, compute_qparams
from .scheme import Scheme

MAX_DAMPING_TRIES = 8  # damping grows x10 per try: from 1% of the mean diagonal to 1e5 times it
SUB_BLOCK = 16  # columns inside a block that feed each other one by one; the rest waits for a matmul
# Size of the buffers a step works in. They are allocated once per call: a fresh large temporary is
# fresh pages, and a page fault costs about 0.5 ms per MB on the benchmark machine, more than most
# steps spend computing on it. A column loop's block of this size also stays in that machine's L3.
WORKSPACE_BYTES = 16 << 20
# On a GPU every op is a kernel launch, and the column loop makes a dozen per column for each piece of
# experts: larger pieces, fewer launches (Qwen3-30B-A3B's 128 gate/up experts: 2 pieces, not 7).
DEVICE_WORKSPACE_BYTES = 64 << 20
# With several CPU threads, the column loop's pieces grow with them: torch splits an elementwise op
# among threads only in grains of 32768 elements, and a 16 MB piece makes each per-column op one grain,
# so the second thread sat idle. Two grains per thread: the column loop 1.15-1.3x faster on 2 threads
# (docs/PERFORMANCE.md); capped, since the loop holds two pieces.
WORKSPACE_BYTES_PER_THREAD = 32 << 20
MAX_WORKSPACE_BYTES = 256 << 20
# On a CPU, an expert with this many output rows (Mixtral's gate/up: 28672, 14336 at half width) is a
# column-loop piece by itself: pieces of several such experts made the loop 6-23% slower, on one thread
# and on two (docs/PERFORMANCE.md, "One wide expert per piece"). Narrower experts (DeepSeek's 2816 and
# Qwen3's 1536 rows) still gain from pieces.
SOLO_ROWS = 8192
# Rows of the Hessian factorization (:func:`_feedback_factor_`) reduced at once by the rows below them:
# a panel of whole solve blocks, about an eighth of the columns and at most this many. On the benchmark
# machine a panel of 256 rows was 10% faster than one 128-column block at 2048 columns, and 512 rows
# 15-29% faster than the factor of wide blocks this replaced at 4096-14336 (docs/PERFORMANCE.md).
FACTOR_PANEL_MAX = 512
FACTOR_PANEL_DIVISOR = 8
# Rows of the source per piece of a 2D transposed copy (:func:`_transpose_into`).
TRANSPOSE_ROWS = 64


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    scheme: Scheme,
    *,
    max_experts_per_chunk: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    scale_dtype: torch.dtype | None = None,
    overwrite_hessian: bool = False,
) -> QuantizedWeight:
    """Quantize stacked expert weights with GPTQ.

    Args:
        w: weights ``[E, out, in]``, or ``[out, in]`` for a single Linear.
        H: Hessians ``[E, in, in]`` (``[in, in]`` with a 2D ``w``), e.g. from
            :meth:`HessianAccumulator.finalize`; symmetric (one triangle is read). Moved to ``w``'s
            device; not modified unless ``overwrite_hessian``.
        scheme: bits, group size, symmetry, damping, block size, act-order.
        max_experts_per_chunk: solve at most this many experts at a time, to bound memory. Besides the
            inputs, the solve holds two buffers per expert of a chunk: the factor (``in * in``
            elements of ``compute_dtype``) and the transposed weights (``out * in``). The result does
            not depend on the chunking.
        compute_dtype: dtype of the solve; float32 as in the reference, float64 for tighter numerics.
        scale_dtype: the dtype scales will be stored in (fp16 for GPTQ files); rounding decisions are
            then made against exactly the stored scale (see :func:`compute_qparams`).
        overwrite_hessian: let the solver keep its factor in ``H``'s memory when ``H`` is already on
            ``w``'s device in ``compute_dtype`` (``H`` is garbage afterwards): one Hessian-sized buffer
            per expert fewer, and no fresh memory to fault in for it.

    Raises:
        ValueError: on mismatched shapes, or NaN/Inf in ``w`` or ``H``.

    Returns:
        A :class:`QuantizedWeight` with ``codes [E, out, in]``, ``scale``/``zero [E, out, n_groups]``.
        With ``scheme.act_order`` each expert has its own column order, so ``g_idx`` is ``[E, in]``
        (``[in]`` for a 2D ``w``): input channel ``c`` of expert ``e`` uses group ``g_idx[e, c]``.
        Without act-order groups are contiguous and ``g_idx`` is None.
    """
    if w.dim() == 2:
        q = gptq_quantize(
            w[None],
            H[None],
            scheme,
            compute_dtype=compute_dtype,
            scale_dtype=scale_dtype,
            overwrite_hessian=overwrite_hessian,
        )
        g_idx = None if q.g_idx is None else q.g_idx[0]
        return replace(q, codes=q.codes[0], scale=q.scale[0], zero=q.zero[0], g_idx=g_idx)
    if w.dim() != 3 or H.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(
            f"expected w [E, out, in] and H [E, in, in], got {tuple(w.shape)} and {tuple(H.shape)}"
        )
    if not _all_finite(w) or not _all_finite(H):
        raise ValueError("weight or Hessian contains NaN or Inf; it cannot be quantized")
    step = w.shape[0] if max_experts_per_chunk is None else max(1, max_experts_per_chunk)
    parts = [
        _quantize_stack(
            w[start : start + step],
            H[start : start + step],
            scheme,
            compute_dtype,
            scale_dtype,
            overwrite_hessian,
        )
        for start in range(0, w.shape[0], step)
    ]
    codes, scale, zero, g_idx = (_cat(items) for items in zip(*parts, strict=True))
    return QuantizedWeight(
        codes=codes,
        scale=scale,
        zero=zero,
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
        g_idx=g_idx,
    )


def _cat(items: tuple[Tensor | None, ...]) -> Tensor | None:
    if items[0] is None:
        return None
    return items[0] if len(items) == 1 else torch.cat(items)


def _all_finite(t: Tensor) -> bool:
    """No NaN or Inf in ``t``: its extremes, one reduction (NaN propagates to them), with no temporary;
    ``isfinite().all()`` writes a boolean copy of the whole stack and is ten times slower."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(low.isfinite() & high.isfinite())


def _quantize_stack(
    w: Tensor,
    H: Tensor,
    scheme: Scheme,
    dtype: torch.dtype,
    scale_dtype: torch.dtype | None,
    overwrite_hessian: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """GPTQ for one chunk of experts: drop dead inputs, order the columns, factor, solve, undo the order."""
    moved = H.to(device=w.device)
    # a copy made here (another device) is the solver's own, whatever the caller asked
    reuse = (overwrite_hessian or moved is not H) and moved.dtype == dtype and moved.is_contiguous()
    H = moved
    diagonal = H.diagonal(dim1=-2, dim2=-1).to(dtype, copy=True)
    dead = diagonal == 0  # inputs never seen in calibration: weight column to 0, H_jj to 1
    diagonal = diagonal + dead.to(dtype)
    Wt = _transposed(w, dtype)
    if dead.any():
        Wt.masked_fill_(dead[:, :, None], 0)
    static = _static_qparams(Wt, scheme, scale_dtype) if scheme.static_groups else None
    perm = _act_order(diagonal) if scheme.act_order else None
    if perm is not None:
        Wt, diagonal = _permute_rows(Wt, perm), diagonal.gather(-1, perm)
    block = _block_size(scheme.block_size, scheme.effective_group_size(Wt.shape[1]), Wt.shape[1])
    G = _feedback_factor(H, perm, diagonal.mean(-1), scheme.damp, block, dtype, out=H if reuse else None)
    codes, scale, zero = _solve(Wt, G, block, scheme, scale_dtype, static, perm)
    if perm is None:
        return codes, scale, zero, None
    position = _inverse_permutation(perm)
    if static is not None:  # groups kept their natural columns: plain layout, no group index
        return codes, scale, zero, None
    g_idx = (position // scheme.effective_group_size(Wt.shape[1])).to(torch.int32)
    return codes, scale, zero, g_idx


def _static_qparams(Wt: Tensor, scheme: Scheme, scale_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Every group's scale and zero from the weights as they are before any error feedback, in the
    natural column order, as float32 ``[E, n_groups, out]`` (``Wt`` is ``[E, in, out]``).

    With these the solve may take columns in any order (act-order) and still store groups of
    consecutive columns, so the output needs no group index and loads in every kernel.
    """
    experts, columns, rows = Wt.shape
    group = scheme.effective_group_size(columns)
    scales = Wt.new_empty(experts, scheme.groups(columns), rows, dtype=torch.float32)
    zeros = torch.empty_like(scales)
    for g in range(scheme.groups(columns)):
        scales[:, g], zeros[:, g] = _group_qparams(Wt[:, g * group : (g + 1) * group], scheme, scale_dtype)
    return scales, zeros


def _transposed(w: Tensor, dtype: torch.dtype) -> Tensor:
    """``w[E, out, in]`` as ``Wt[E, in, out]`` in ``dtype``: the solver's working copy, a column a row.

    One expert at a time, as 2D transposed copies (:func:`_transpose_into`; a batched one is several
    times slower), converting on the way: no float32 copy of the expert first.
    """
    experts, rows, columns = w.shape
    Wt = torch.empty(experts, columns, rows, dtype=dtype, device=w.device)
    for expert in range(experts):
        _transpose_into(Wt[expert], w[expert])
    return Wt


def _transpose_into(out: Tensor, source: Tensor) -> None:
    """``out = source^T`` (2D, converted to ``out``'s dtype), a band of ``TRANSPOSE_ROWS`` source rows at
    a time on a CPU.

    A whole-matrix transposed copy on a CPU reads or writes a new cache line for nearly every element
    (2-6 ns an element at 1536 x 2048 to 4096 x 14336, worse with a dtype conversion); a band's columns
    land in a few lines each, 1.5-6x faster (docs/PERFORMANCE.md). A GPU's copy kernel tiles by itself.
    """
    if out.device.type != "cpu":
        out.copy_(source.mT)
        return
    for start in range(0, source.shape[0], TRANSPOSE_ROWS):
        out[:, start : start + TRANSPOSE_ROWS].copy_(source[start : start + TRANSPOSE_ROWS].mT)


# ------------------------------------------------------------------------------------------ column loop


def _solve(
    Wt: Tensor,
    G: Tensor,
    block: int,
    scheme: Scheme,
    scale_dtype: torch.dtype | None,
    static: tuple[Tensor, Tensor] | None = None,
    perm: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GPTQ column loop with lazy block updates (the paper's Algorithm 1), batched over experts.

    ``Wt[E, in, out]`` holds the weights transposed; it is overwritten, column by column, with the
    residuals ``w - dequant(q)``. ``G`` is the factor of :func:`_feedback_factor` for this ``block``
    size. A group's scale and zero point are computed from the current, error-updated weights of its
    columns when the loop enters the group, or, with ``static`` (from :func:`_static_qparams`), taken
    from there: then column ``c`` of expert ``e`` uses the group of its natural column ``perm[e, c]``.

    Experts go in chunks whose ``[chunk, block, out]`` block stays in cache; each expert's arithmetic is
    the same whatever the chunk, so the result does not depend on it. Returns ``codes [E, out, in]``
    with columns back in their natural order, ``scales`` and ``zeros [E, out, n_groups]``.
    """
    experts, columns, rows = Wt.shape
    codes = torch.empty(experts, rows, columns, dtype=torch.uint8, device=Wt.device)
    scales = torch.empty(experts, rows, scheme.groups(columns), dtype=torch.float32, device=Wt.device)
    zeros = torch.empty(experts, rows, scheme.groups(columns), dtype=torch.int32, device=Wt.device)
    step = _experts_per_piece(experts, block, rows, Wt)
    codes_t = torch.empty(step, columns, rows, dtype=torch.uint8, device=Wt.device)
    position = None if perm is None else _inverse_permutation(perm)
    natural = None if perm is None else torch.empty(columns, rows, dtype=torch.uint8, device=Wt.device)
    for start in range(0, experts, step):
        chunk = slice(start, start + step)
        k = codes[chunk].shape[0]
        fixed = None
        if static is not None:
            fixed = (
                static[0][chunk],
                static[1][chunk],
                _column_groups(perm, chunk, k, columns, scheme, Wt.device),
            )
        _solve_chunk(
            Wt[chunk], G[chunk], block, codes_t[:k], scales[chunk], zeros[chunk], scheme, scale_dtype, fixed
        )
        # Back in natural column order (by rows), then transposed: 2D transposes, which torch tiles.
        for expert in range(k):
            solved = codes_t[expert]
            if position is not None:
                solved = torch.index_select(solved, 0, position[start + expert], out=natural)
            _transpose_into(codes[start + expert], solved)
    return codes, scales, zeros


def _workspace_bytes(device: torch.device) -> int:
    return WORKSPACE_BYTES if device.type == "cpu" else DEVICE_WORKSPACE_BYTES


def _experts_per_piece(experts: int, block: int, rows: int, Wt: Tensor) -> int:
    """How many experts the column loop takes at once: as many as the workspace holds blocks of, but
    on a CPU one at a time when each has at least ``SOLO_ROWS`` rows."""
    if Wt.device.type == "cpu" and rows >= SOLO_ROWS:
        return 1
    piece = _column_workspace_bytes(Wt.device)
    return min(experts, max(1, piece // (block * rows * Wt.element_size())))


def _column_workspace_bytes(device: torch.device) -> int:
    """The column loop's piece: :func:`_workspace_bytes`, or on a CPU with several threads enough that
    each per-column op gives every thread work."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return _workspace_bytes(device)
    return min(WORKSPACE_BYTES_PER_THREAD * threads, MAX_WORKSPACE_BYTES)


def _column_groups(
    perm: Tensor | None, chunk: slice, k: int, columns: int, scheme: Scheme, device: torch.device
) -> Tensor:
    """``[k, in]``: the natural group of each solve-order column of a chunk's experts."""
    natural = torch.arange(columns, device=device)
    order = natural.expand(k, columns) if perm is None else perm[chunk]
    return order // scheme.effective_group_size(columns)


def _solve_chunk(
    Rt: Tensor,
    G: Tensor,
    block: int,
    codes_t: Tensor,
    scales: Tensor,
    zeros: Tensor,
    scheme: Scheme,
    scale_dtype: torch.dtype | None,
    static: tuple[Tensor, Tensor, Tensor] | None = None,
) -> None:
    """The column loop for one chunk of experts, filling ``codes_t`` (transposed), ``scales``, ``zeros``.

    ``Rt`` holds the weights of the columns not yet quantized and the residuals of those that are. A
    block's current weights ``Ct`` are its weights plus one matmul of the residuals before it. Inside
    the block, as in the reference, each column's scaled error ``Et`` goes into the later columns, but
    at once only into the rest of its sub-block (a few rows of ``Ct``, in cache), and into the rest of
    the block by one matmul when the sub-block is done.
    """
    experts, columns, rows = Rt.shape
    group = scheme.effective_group_size(columns)
    sub = _aligned_block(min(SUB_BLOCK, block), group, columns)
    Ct = Rt.new_empty(experts, block, rows)
    Et = torch.empty_like(Ct)
    scratch = torch.empty(experts, rows, dtype=torch.float32, device=Rt.device)
    if static is not None:
        static_scales, static_zeros, column_groups = static
        scales.copy_(static_scales.mT)
        zeros.copy_(static_zeros.mT.to(torch.int32))
        # each column's row of the [experts * groups, rows] tables: its expert's, its natural group's
        table_rows = torch.arange(experts, device=Rt.device)[:, None] * static_scales.shape[1] + column_groups
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        current = torch.baddbmm(Rt[:, i1:i2], G[:, i1:i2, :i1], Rt[:, :i1], out=Ct[:, : i2 - i1])
        U_block = G[:, i1:i2, i1:i2]  # U[block, block], transposed
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            if static is not None:  # the sub-block's scales and zeros, [experts, columns, rows]
                sub_scales, sub_zeros = _static_rows(
                    static_scales, static_zeros, table_rows[:, i1 + j1 : i1 + j2]
                )
            for c in range(j1, j2):
                if static is not None:
                    scale, zero = sub_scales[:, c - j1], sub_zeros[:, c - j1]
                elif (i1 + c) % group == 0:  # a group of all columns is entered before any feedback
                    group_now = current[:, c : c + group] if i1 + c else Rt[:, :group]
                    scale, zero = _group_qparams(group_now, scheme, scale_dtype)
                    scales[:, :, (i1 + c) // group] = scale
                    zeros[:, :, (i1 + c) // group] = zero.to(torch.int32)
                q = codes_t[:, i1 + c]
                _quantize_column(
                    current, c, j2, Rt[:, i1 + c], Et, q, scratch, U_block, scale, zero, scheme.maxq
                )
            if j2 < i2 - i1:  # the sub-block's errors into the rest of the block
                current[:, j2:].baddbmm_(U_block[:, j2:, j1:j2], Et[:, j1:j2], alpha=-1)


def _static_rows(scales: Tensor, zeros: Tensor, table_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The static scales and zeros ``[E, groups, rows]`` of a run of columns, ``[E, columns, rows]``.

    One ``index_select`` of table rows per tensor for all the columns: per-column advanced indexing
    costs about three times as much, and the solver's innermost loop pays for it every column.
    """
    flat, shape = table_rows.reshape(-1), (*table_rows.shape, scales.shape[-1])

    def pick(table: Tensor) -> Tensor:
        return table.reshape(-1, shape[-1]).index_select(0, flat).view(shape)

    return pick(scales), pick(zeros)


def _quantize_column(
    current: Tensor,
    c: int,
    end: int,
    residual: Tensor,
    Et: Tensor,
    q: Tensor,
    scratch: Tensor,
    U_block: Tensor,
    scale: Tensor,
    zero: Tensor,
    maxq: int,
) -> None:
    """Quantize column ``c`` of the block into ``q``, turn its weight row ``residual`` into the residual,
    and feed its scaled error ``Et[:, c]`` into the block's columns after it up to ``end`` (the end of
    its sub-block).

    The arithmetic is :func:`~moeconvert.quant.rtn.quantize_codes` then
    :func:`~moeconvert.quant.rtn.dequantize`, op for op, done in place in a float32 ``scratch`` column
    (it holds the code exactly): this is the innermost loop of the solver, where each temporary costs
    as much as the op that fills it.
    """
    w, err = current[:, c], Et[:, c]
    code = torch.div(w, scale, out=scratch) if w.dtype == torch.float32 else scratch.copy_(w).div_(scale)
    code.round_().add_(zero).clamp_(0, maxq)
    q.copy_(code)
    dequantized = code.sub_(zero).mul_(scale)
    torch.sub(w, dequantized, out=err).div_(U_block[:, c, c, None])
    residual.sub_(dequantized)
    if c + 1 < end:
        current[:, c + 1 : end].addcmul_(U_block[:, c + 1 : end, c, None], err[:, None, :], value=-1)


def _group_qparams(current: Tensor, scheme: Scheme, scale_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Scale and zero ``[E, out]`` of a group from its current columns, ``current[E, g, out]``.

    Blocks hold whole groups and sub-blocks start at group starts (:func:`_block_size`), so when a
    group is entered its columns have no pending feedback: this is the group as the error feedback has
    left it. :func:`compute_qparams` needs only each row's extremes (exactly), which a pass down the
    contiguous columns gives (``amin`` and ``amax``: ``aminmax`` over this dimension is 5x slower).
    """
    extremes = torch.stack([current.amin(dim=1), current.amax(dim=1)], dim=-1)
    scale, zero = compute_qparams(extremes, scheme, scale_dtype=scale_dtype)
    return scale[..., 0], zero[..., 0]


def _block_size(block: int, group: int, columns: int) -> int:
    """The lazy block: ``block`` columns, adjusted so that every group lies inside one block.

    A group's scale is computed from its current weights, and only a block's columns are current (the
    feedback from earlier blocks is added when a block starts); a single group of all columns is the
    exception, as it is entered before any feedback.
    """
    if group >= columns or block % group == 0:
        return block
    return block // group * group if group < block else group


def _aligned_block(block: int, group: int, columns: int) -> int:
    """A sub-block size that tiles groups: every group either fits in one sub-block or starts at a
    sub-block start, so its columns are all current when it is entered."""
    if group >= columns or block % group == 0 or group % block == 0:
        return block
    if group < block:
        return block // group * group
    return max(d for d in range(1, block + 1) if group % d == 0)


# -------------------------------------------------------------------------------------- column order


def _act_order(diagonal: Tensor) -> Tensor:
    """Each expert's columns by decreasing Hessian diagonal; ties keep their order (deterministic)."""
    return torch.argsort(diagonal, dim=-1, descending=True, stable=True)


def _permute_rows(Wt: Tensor, perm: Tensor) -> Tensor:
    """``Wt[e, perm[e]]`` for every expert, in place, through one expert-sized buffer."""
    rows = torch.empty_like(Wt[0])
    for expert in range(Wt.shape[0]):
        Wt[expert].copy_(torch.index_select(Wt[expert], 0, perm[expert], out=rows))
    return Wt


def _inverse_permutation(perm: Tensor) -> Tensor:
    """``position[e, c]``: where column ``c`` of expert ``e`` went under ``perm``."""
    order = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, order)


# ------------------------------------------------------------------------------------- factorization


def _feedback_factor(
    H: Tensor,
    perm: Tensor | None,
    mean_diagonal: Tensor,
    damp: float,
    block: int,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """What the column loop needs of ``U``, the upper Cholesky factor of ``(H + lambda I)^-1``, as a
    lower ``G`` (transposed, so that the solver reads rows): for each block ``b`` of ``block`` columns,
    ``G[b, b] = U[b, b]^T`` and ``G[b, :b] = (V[:b, b] U[b, b])^T``, where ``V V^T = H + lambda I``
    (``V = U^-1`` upper).

    ``H`` is taken in the solve's column order (``perm``, if given) with dead inputs' ``H_jj`` set to 1,
    and ``lambda = damp * mean_diagonal`` (the mean of that diagonal). With ``W = V^T`` (lower,
    ``W^T W = H + lambda I``), ``G[b, b] = W[b, b]^-1`` and ``G[b, :b] = W[b, b]^-1 W[b, :b]``: see
    :func:`_feedback_factor_`.

    An expert whose factorization fails in floating point is redone with ten times the damping (the
    others keep theirs); one that never succeeds gets ``G = I``, i.e. no error feedback:
    round-to-nearest. Experts go a few at a time through buffers allocated once. ``out`` (``H`` itself
    may be given) receives ``G``: each piece of experts is copied out of ``H`` before its factor is
    written.
    """
    experts, n = H.shape[0], H.shape[-1]
    G = torch.empty(experts, n, n, dtype=dtype, device=H.device) if out is None else out
    step = min(experts, max(1, _workspace_bytes(H.device) // (n * n * G.element_size())))
    A, scratch = (torch.empty(step, n, n, dtype=dtype, device=H.device) for _ in range(2))
    for start in range(0, experts, step):
        chunk = slice(start, start + step)
        k = G[chunk].shape[0]
        _permuted_hessian(H[chunk], None if perm is None else perm[chunk], out=A[:k], scratch=scratch[:k])
        _damped_factor(A[:k], mean_diagonal[chunk], damp, block, out=G[chunk], scratch=scratch[:k])
    return G


def _permuted_hessian(H: Tensor, perm: Tensor | None, *, out: Tensor, scratch: Tensor) -> None:
    """``out = P H P^T`` (``H`` in the solve's column order) in ``out``'s dtype, with a zero diagonal
    entry (a dead input) set to 1. ``scratch`` is a buffer like ``out``, so that no Hessian-sized
    temporary is allocated (Mixtral-8x7B's down Hessian is 0.8 GB)."""
    if perm is None:
        out.copy_(H)
    else:
        for expert in range(H.shape[0]):
            torch.index_select(H[expert].to(out.dtype), 0, perm[expert], out=scratch[expert])  # rows
            torch.index_select(scratch[expert], 1, perm[expert], out=out[expert])  # then columns
    diagonal = out.diagonal(dim1=-2, dim2=-1)
    diagonal.add_((diagonal == 0).to(out.dtype))


def _damped_factor(
    A: Tensor, mean_diagonal: Tensor, damp: float, block: int, *, out: Tensor, scratch: Tensor
) -> None:
    """``out = G`` of ``A + lambda I`` per expert (:func:`_try_factor`), raising ``lambda`` for the experts
    where the factorization fails; ``A`` is left as it is, ``scratch`` (like ``A``) is overwritten.

    Every expert still failing at a given try has had the same damping sequence, so one fraction serves
    them all, and a retried expert gets exactly what a first try with that damping would give.
    """
    fraction = damp
    ok = _try_factor(A, fraction * mean_diagonal, block, out=out, scratch=scratch)
    for _ in range(MAX_DAMPING_TRIES - 1):
        failed = (~ok).nonzero().flatten().tolist()
        if not failed:
            return
        fraction = max(10 * fraction, 0.01)
        for e in failed:
            one = slice(e, e + 1)
            ok[one] = _try_factor(
                A[one], fraction * mean_diagonal[one], block, out=out[one], scratch=scratch[one]
            )
    out[~ok] = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _try_factor(A: Tensor, damping: Tensor, block: int, *, out: Tensor, scratch: Tensor) -> Tensor:
    """One attempt: ``out = G`` of ``A + diag(damping)`` (:func:`_feedback_factor_`, the damped matrix
    in ``scratch``); which experts succeeded."""
    scratch.copy_(A).diagonal(dim1=-2, dim2=-1).add_(damping[:, None])
    info = _feedback_factor_(scratch, block, _panel_rows(A.shape[-1], block), out=out)
    return (info == 0) & out.sum(dim=(-2, -1)).isfinite()  # NaN and Inf reach the sum


def _panel_rows(n: int, block: int) -> int:
    """Rows reduced at once: whole blocks, ``n / FACTOR_PANEL_DIVISOR`` up to ``FACTOR_PANEL_MAX``."""
    return max(block, min(n // FACTOR_PANEL_DIVISOR, FACTOR_PANEL_MAX) // block * block)


def _feedback_factor_(S: Tensor, block: int, panel: int, *, out: Tensor) -> Tensor:
    """``out = G`` (see :func:`_feedback_factor`) of each symmetric ``S[e]``, without forming ``W``;
    ``S`` is overwritten with its reduced rows. Returns LAPACK-style ``info`` per expert.

    Block rows go from the last up. With ``S'[J]`` block row ``J`` of ``S`` reduced by the rows below
    it and ``W[J, J]^T W[J, J] = S'[J, J]`` (LAPACK, small), ``W``'s row is ``W[J, :j] = W[J, J]^-T
    S'[J, :j]``, so ``G[J, :j] = W[J, J]^-1 W[J, :j] = S'[J, J]^-1 S'[J, :j]``, one product. What a row
    ``K`` below contributes to the reduction, ``W[K, J]^T W[K, :je]``, is ``G[K, J]^T S'[K, :je]`` by the
    same identity: ``G`` and the reduced rows are all the factorization needs, and ``W`` is never
    formed. Nearly all of the ``n^3 / 3`` flops are that reduction, done for a ``panel`` of blocks at
    once (one large batched matmul), then inside the panel block by block.
    """
    experts, n = S.shape[0], S.shape[-1]
    info = torch.zeros(experts, dtype=torch.int32, device=S.device)
    identity = torch.eye(block, dtype=S.dtype, device=S.device)
    for p in reversed(range(0, n, panel)):
        pe = min(p + panel, n)
        _reduce_rows_(S, out, p, pe, n)
        for j in reversed(range(p, pe, block)):
            je = min(j + block, pe)
            _reduce_rows_(S, out, j, je, pe)
            # S'[J, J] = W_JJ^T W_JJ with W_JJ lower: reversed, that is an upper Cholesky factorization.
            upper, block_info = torch.linalg.cholesky_ex(S[:, j:je, j:je].flip(-2, -1), upper=True)
            info = torch.where(info == 0, block_info, info)
            inverse = torch.linalg.solve_triangular(
                upper.flip(-2, -1), identity[: je - j, : je - j], upper=False
            )  # W_JJ^-1, lower
            out[:, j:je, j:je] = inverse
            if j:
                torch.bmm(inverse @ inverse.mT, S[:, j:je, :j], out=out[:, j:je, :j])
    return info


def _reduce_rows_(S: Tensor, G: Tensor, j: int, je: int, below: int) -> None:
    """Rows ``j:je`` of ``S`` reduced by the factored rows ``je:below``: ``S'[J, :je] -= G[K, J]^T
    S'[K, :je]``; ``G``'s entries right of the diagonal in those rows are zeroed (never read otherwise)."""
    if je < below:
        S[:, j:je, :je].baddbmm_(G[:, je:below, j:je].mT, S[:, je:below, :je], alpha=-1)
        G[:, j:je, je:below].zero_()
