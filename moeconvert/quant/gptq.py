"""GPTQ (Frantar et al. 2022) for a whole stack of experts at once.

The solver follows the paper and its reference implementation line by line, with one leading expert
dimension added to every tensor: ``W[E, out, in]`` and ``H[E, in, in]``. Dead inputs are dropped,
the Hessian is damped and inverted through Cholesky, and columns are quantized one at a time, each
rounding error fed back into the not-yet-quantized columns, lazily in blocks. The Python loops are over
columns and blocks, as in the reference (and, only if asked to bound memory, over chunks of experts);
every step inside them is one batched tensor op over all experts.

The integer grid (codes, scales, zero points) is :mod:`moeconvert.quant.rtn`'s, so a GPTQ result and a
round-to-nearest result are interchangeable for packing and output formats. Statistics are gathered in
:mod:`moeconvert.quant.hessian`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .rtn import QuantizedWeight, compute_qparams, dequantize, quantize_codes
from .scheme import Scheme

MAX_DAMPING_TRIES = 8  # damping grows x10 per try: from 1% of the mean diagonal to 1e5 times it


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    scheme: Scheme,
    *,
    max_experts_per_chunk: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantize stacked expert weights with GPTQ.

    Args:
        w: weights ``[E, out, in]``, or ``[out, in]`` for a single Linear.
        H: Hessians ``[E, in, in]`` (``[in, in]`` with a 2D ``w``), e.g. from
            :meth:`HessianAccumulator.finalize`. Moved to ``w``'s device.
        scheme: bits, group size, symmetry, damping, block size, act-order.
        max_experts_per_chunk: solve at most this many experts at a time, to bound memory
            (the solve holds about ``3 * E * in * in`` elements of ``compute_dtype`` besides the inputs).
        compute_dtype: dtype of the solve; float32 as in the reference, float64 for tighter numerics.
        scale_dtype: the dtype scales will be stored in (fp16 for GPTQ files); rounding decisions are
            then made against exactly the stored scale (see :func:`compute_qparams`).

    Raises:
        ValueError: on mismatched shapes, or NaN/Inf in ``w`` or ``H``.

    Returns:
        A :class:`QuantizedWeight` with ``codes [E, out, in]``, ``scale``/``zero [E, out, n_groups]``.
        With ``scheme.act_order`` each expert has its own column order, so ``g_idx`` is ``[E, in]``
        (``[in]`` for a 2D ``w``): input channel ``c`` of expert ``e`` uses group ``g_idx[e, c]``.
        Without act-order groups are contiguous and ``g_idx`` is None.
    """
    if w.dim() == 2:
        q = gptq_quantize(w[None], H[None], scheme, compute_dtype=compute_dtype, scale_dtype=scale_dtype)
        g_idx = None if q.g_idx is None else q.g_idx[0]
        return replace(q, codes=q.codes[0], scale=q.scale[0], zero=q.zero[0], g_idx=g_idx)
    if w.dim() != 3 or H.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(
            f"expected w [E, out, in] and H [E, in, in], got {tuple(w.shape)} and {tuple(H.shape)}"
        )
    if not bool(w.isfinite().all()) or not bool(H.isfinite().all()):
        raise ValueError("weight or Hessian contains NaN or Inf; it cannot be quantized")
    step = w.shape[0] if max_experts_per_chunk is None else max(1, max_experts_per_chunk)
    parts = [
        _quantize_stack(w[start : start + step], H[start : start + step], scheme, compute_dtype, scale_dtype)
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
    return None if items[0] is None else torch.cat(items)


def _quantize_stack(
    w: Tensor, H: Tensor, scheme: Scheme, dtype: torch.dtype, scale_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """GPTQ for one chunk of experts: prepare the Hessian, solve, undo the column order."""
    W = w.to(dtype=dtype, copy=True)
    H = H.to(device=W.device, dtype=dtype, copy=True)
    W, H = _drop_dead_inputs(W, H)
    perm = _act_order(H) if scheme.act_order else None
    if perm is not None:
        W, H = _permute_columns(W, perm), _permute_square(H, perm)
    U = _inverse_cholesky_upper(H, scheme.damp)
    del H
    codes, scale, zero = _solve(W, U, scheme, scale_dtype)
    if perm is None:
        return codes, scale, zero, None
    position = _inverse_permutation(perm)
    codes = codes.gather(-1, position[:, None, :].expand_as(codes))
    g_idx = (position // scheme.effective_group_size(W.shape[-1])).to(torch.int32)
    return codes, scale, zero, g_idx


def _solve(
    W: Tensor, U: Tensor, scheme: Scheme, scale_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The GPTQ column loop with lazy block updates (the paper's Algorithm 1), batched over experts.

    ``U`` is the upper Cholesky factor of ``H^-1``. A group's scale and zero point are computed from the
    current, error-updated weights of its columns when the loop enters the group. ``W`` is overwritten.
    """
    experts, rows, columns = W.shape
    group = scheme.effective_group_size(columns)
    block = _aligned_block(scheme.block_size, group, columns)
    scales = torch.empty(experts, rows, scheme.groups(columns), dtype=torch.float32, device=W.device)
    zeros = torch.empty(experts, rows, scheme.groups(columns), dtype=torch.int32, device=W.device)
    code_blocks = []
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1 = W[:, :, i1:i2].clone()
        U1 = U[:, i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        Q1 = []
        for i in range(i2 - i1):
            column = i1 + i
            if column % group == 0:
                # A group longer than the block starts at a block start, so its columns still in W
                # have no pending updates: this is the group as the error feedback has left it.
                current = torch.cat([W1[:, :, i : i + group], W[:, :, i2 : column + group]], dim=-1)
                scale, zero = compute_qparams(current, scheme, scale_dtype=scale_dtype)
                scales[:, :, column // group] = scale[..., 0]
                zeros[:, :, column // group] = zero[..., 0].to(torch.int32)
            w = W1[:, :, i : i + 1]
            q = quantize_codes(w, scale, zero, scheme.maxq)
            err = (w - dequantize(q, scale, zero).to(w.dtype)) / U1[:, None, i, i : i + 1]
            W1[:, :, i:] -= err * U1[:, None, i, i:]
            Err1[:, :, i : i + 1] = err
            Q1.append(q)
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]
        code_blocks.append(torch.cat(Q1, dim=-1))
    return torch.cat(code_blocks, dim=-1), scales, zeros


def _drop_dead_inputs(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs never seen in calibration (``H_jj = 0``): weight column to 0, ``H_jj`` to 1, in place."""
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1).add_(dead.to(H.dtype))
    return W.masked_fill_(dead[:, None, :], 0), H


def _act_order(H: Tensor) -> Tensor:
    """Each expert's columns by decreasing Hessian diagonal; ties keep their order (deterministic)."""
    return torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)


def _permute_columns(W: Tensor, perm: Tensor) -> Tensor:
    return W.gather(-1, perm[:, None, :].expand_as(W))


def _permute_square(H: Tensor, perm: Tensor) -> Tensor:
    rows = H.gather(1, perm[:, :, None].expand_as(H))
    return rows.gather(2, perm[:, None, :].expand_as(H))


def _inverse_permutation(perm: Tensor) -> Tensor:
    """``position[e, c]``: where column ``c`` of expert ``e`` went under ``perm``."""
    order = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, order)


def _inverse_cholesky_upper(H: Tensor, damp: float) -> Tensor:
    """Upper ``U`` with ``U^T U = (H + lambda I)^-1`` per expert, ``lambda = damp * mean(diag H)``.

    ``H`` is damped in place. An expert whose factorization fails in floating point retries with ten
    times the damping (the others keep theirs); one that never succeeds gets the identity, i.e. no error
    feedback: round-to-nearest.
    """
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)
    H.diagonal(dim1=-2, dim2=-1).add_(damp * mean_diag[:, None])
    U, ok = _try_inverse_cholesky_upper(H)
    fraction = damp
    for _ in range(MAX_DAMPING_TRIES - 1):
        failed = (~ok).nonzero().flatten()
        if failed.numel() == 0:
            return U
        extra, fraction = max(10 * fraction, 0.01) - fraction, max(10 * fraction, 0.01)
        retry = H[failed]
        retry.diagonal(dim1=-2, dim2=-1).add_(extra * mean_diag[failed, None])
        H[failed] = retry
        U[failed], ok[failed] = _try_inverse_cholesky_upper(retry)
    U[~ok] = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return U


def _try_inverse_cholesky_upper(H: Tensor) -> tuple[Tensor, Tensor]:
    """One batched attempt; returns the factors and which experts succeeded."""
    L, info = torch.linalg.cholesky_ex(H)
    ok = (info == 0) & L.isfinite().all(-1).all(-1)
    L[~ok] = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)  # keep cholesky_inverse away from them
    H_inverse = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(H_inverse, upper=True)
    return U, ok & (info == 0) & U.isfinite().all(-1).all(-1)


def _aligned_block(block: int, group: int, columns: int) -> int:
    """A block size that tiles groups: every group either fits in one block or starts at a block start.

    Blocking does not change the result in exact arithmetic; aligning it guarantees that the weights a
    group's scale is computed from are up to date (no pending lazy updates) when the group is entered.
    """
    if group >= columns or block % group == 0 or group % block == 0:
        return block
    if group < block:
        return block // group * group
    return max(d for d in range(1, block + 1) if group % d == 0)
