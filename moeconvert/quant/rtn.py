"""Round-to-nearest quantization on the shared integer grid, and the result type every method returns.

Everything is batched over leading dimensions, so a stack of experts ``[E, out, in]`` is quantized in
one call with the same result as a loop over experts. The grid follows the GPTQ reference quantizer:
the asymmetric range always contains 0 (so zero padding never changes a group's parameters), rows
with an empty range get the reference's ``[-1, 1]`` fallback, and codes are ``round(w / scale) + zero``
clamped to ``[0, maxq]``. Scales are computed in float32; when they will be stored in a narrower
dtype (fp16 for GPTQ files, bf16 for compressed-tensors) pass ``scale_dtype`` so the codes are chosen
against the exact scale the file will hold, rounded up so the group's range still fits the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeconvert.quant.scheme import Scheme

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus per-group scale and zero for a weight ``[..., out, in]``.

    ``codes`` are unsigned (uint8) in ``[0, 2**bits - 1]``; ``scale`` is float32 and ``zero`` int32,
    both ``[..., out, n_groups]``. ``g_idx`` maps input column ``i`` to its group; it is ``None`` when
    that map is the plain ``i // group_size`` and shaped ``[in]`` or ``[..., in]`` (one map per
    leading index, e.g. per expert) when act-order permuted the groups. ``group_size`` is -1 for one
    group per output row, as in :class:`Scheme`.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.codes.dim() < 2 or self.codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor [..., out, in], got {self.codes.dtype}")
        expected = (*self.codes.shape[:-1], self.n_groups)
        if tuple(self.scale.shape) != expected or tuple(self.zero.shape) != expected:
            raise ValueError(
                f"scale {list(self.scale.shape)} and zero {list(self.zero.shape)} must be {list(expected)} "
                f"for codes {list(self.codes.shape)} with group size {self.group_size}"
            )
        if self.g_idx is not None and self.g_idx.shape[-1] != self.in_features:
            raise ValueError(f"g_idx has {self.g_idx.shape[-1]} entries for {self.in_features} input columns")

    @property
    def in_features(self) -> int:
        return self.codes.shape[-1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[-2]

    @property
    def n_groups(self) -> int:
        gs = self.group_size
        return 1 if gs == -1 else -(-self.in_features // gs)

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    def group_index(self) -> torch.Tensor:
        """The group of every input column: ``g_idx`` if set, else ``i // group_size`` (int32 [in])."""
        if self.g_idx is not None:
            return self.g_idx
        columns = torch.arange(self.in_features, device=self.codes.device, dtype=torch.int32)
        return columns // self.effective_group_size

    def dequantize(self) -> torch.Tensor:
        """float32 ``scale * (q - zero)`` of shape ``[..., out, in]``."""
        if self.g_idx is None:
            return _dequantize_contiguous(self.codes, self.scale, self.zero, self.effective_group_size)
        index = self.g_idx.long().unsqueeze(-2).expand(*self.codes.shape)
        return dequantize(self.codes, self.scale.gather(-1, index), self.zero.gather(-1, index))


def compute_qparams(
    w: torch.Tensor, scheme: Scheme, *, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of ``w [..., out, g]`` over its last dim, as float32 ``[..., out, 1]``.

    ``zero`` holds integers (as float, ready for arithmetic). Symmetric: ``zero = 2**(bits-1)`` and
    ``scale = 2*max|w| / maxq``. Asymmetric: range ``[min(w, 0), max(w, 0)]`` mapped onto ``[0, maxq]``.
    A row whose range is empty (all zeros) gets scale ``2/maxq`` and zero ``2**(bits-1)``, and no scale
    falls below the smallest normal number of its storage dtype, so it is always positive and finite
    for finite input. Runs without host synchronisation, so a GPU solver may call it per group.
    """
    w = w.float()
    maxq = scheme.maxq
    mid = float(2 ** (scheme.bits - 1))
    if scheme.sym:
        xmin = None
        span = 2 * w.abs().amax(dim=-1, keepdim=True)
    else:
        xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
        span = w.amax(dim=-1, keepdim=True).clamp(min=0) - xmin
    empty = span == 0
    scale = torch.where(empty, torch.full_like(span, 2.0), span) / maxq
    scale = _storable_scale(scale, scale_dtype or torch.float32)
    if xmin is None:
        return scale, torch.full_like(scale, mid)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, torch.where(empty, torch.full_like(zero, mid), zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(w / scale) + zero, 0, maxq)`` (round half to even, as the reference)."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, maxq).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 ``(q - zero) * scale``; ``q - zero`` is an exact integer, so one rounding in total."""
    return (q.float() - zero.float()) * scale.float()


def rtn_quantize(
    w: torch.Tensor, scheme: Scheme, *, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w [..., out, in]`` in groups of ``scheme.group_size`` columns.

    A last group shorter than the group size is allowed: the missing columns are padded with zeros,
    which cannot change the group's parameters because the grid range always contains 0.
    """
    if w.dim() < 2:
        raise ValueError(f"expected a weight [..., out, in], got shape {list(w.shape)}")
    in_features = w.shape[-1]
    size = scheme.effective_group_size(in_features)
    groups = scheme.groups(in_features)
    w = w.float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or Inf; it cannot be quantized")
    grouped = _split_groups(w, size, groups)
    scale, zero = compute_qparams(grouped, scheme, scale_dtype=scale_dtype)
    codes = quantize_codes(grouped, scale, zero, scheme.maxq).flatten(-2)[..., :in_features]
    return QuantizedWeight(
        codes=codes.contiguous(),
        scale=scale.squeeze(-1),
        zero=zero.squeeze(-1).to(torch.int32),
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
    )


def _split_groups(w: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    """``[..., out, in]`` -> ``[..., out, groups, size]``, zero-padding a short last group."""
    pad = groups * size - w.shape[-1]
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.unflatten(-1, (groups, size))


def _dequantize_contiguous(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, size: int
) -> torch.Tensor:
    """Dequantize with plain ``i // size`` groups without materialising per-column scales."""
    in_features = codes.shape[-1]
    grouped = _split_groups(codes, size, scale.shape[-1])
    out = dequantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1))
    return out.flatten(-2)[..., :in_features]


def _storable_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp into ``dtype``'s normal range and round up to a value ``dtype`` holds exactly (as float32).

    Rounding up, not to nearest, keeps every value of the group inside the grid, so the error bound
    ``|w - dequant| <= scale / 2`` survives storing the scale in fp16 or bf16.
    """
    if dtype not in _INT_VIEW:
        raise ValueError(f"scales can be stored as float16, bfloat16 or float32, not {dtype}")
    info = torch.finfo(dtype)
    scale = scale.clamp(min=info.tiny, max=info.max)
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    next_up = (stored.view(_INT_VIEW[dtype]) + 1).view(dtype)
    stored = torch.where(stored.float() < scale, next_up, stored)
    return stored.float()
