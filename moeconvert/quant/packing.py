"""Exact bit layouts of quantized Linear weights in GPTQ (v1) and compressed-tensors files.

Pure tensor functions, each with its inverse. They take and return :class:`QuantizedWeight` on the
shared unsigned grid and are batched over leading dims: packing ``[E, out, in]`` gives every tensor a
leading ``E`` and equals stacking the per-expert results, so ``tensors[name][e]`` is expert ``e``'s.

Both formats pack unsigned codes into int32 words lowest bits first, ``32 // bits`` per word:

* GPTQ v1 (AutoGPTQ's ``QuantLinear`` layout, ``checkpoint_format: gptq``): ``qweight`` int32 ``[in*bits/32, out]``
  packed along the input dim; ``qzeros`` int32 ``[n_groups, out*bits/32]`` packed along the output dim
  holding ``zero - 1`` (the v1 off-by-one, undone by every v1 reader); ``scales`` fp16
  ``[n_groups, out]``; ``g_idx`` int32 ``[in]``.
* compressed-tensors ``pack-quantized`` (vLLM's main path; transformers loads it with the
  ``compressed-tensors`` package): ``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` holding the signed
  code plus ``2**(bits-1)``, which is exactly our unsigned code; ``weight_scale`` ``[out, n_groups]`` in
  the model's dtype; ``weight_zero_point`` only when asymmetric, the signed zero point plus
  ``2**(bits-1)`` (again our unsigned zero) packed along the output dim, ``[ceil(out*bits/32), n_groups]``;
  ``weight_shape`` int64 ``[2]``. The library uses this format for weight-only int8 too
  ("int-quantized" is its name for int8 weights with quantized activations).
"""

from __future__ import annotations

import sys

import torch

from moeconvert.quant.rtn import QuantizedWeight


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values along the last dim into int32 words, lowest bits first.

    Element ``j`` of word ``k`` is value ``k * (32 // bits) + j`` at bit offset ``j * bits``; a short
    last word is padded with 0. Words with the top bit set come out negative (int32 two's complement).
    Works one bit field at a time so the temporaries stay at the size of the packed result.
    """
    per_word = _per_word(bits)
    if values.numel() and not (int(values.min()) >= 0 and int(values.max()) <= 2**bits - 1):
        raise ValueError(f"values must lie in [0, {2**bits - 1}] to be packed as {bits}-bit")
    count = values.shape[-1]
    words = -(-count // per_word)
    if words * per_word != count:
        values = torch.nn.functional.pad(values, (0, words * per_word - count))
    if bits in (4, 8) and sys.byteorder == "little":
        return _pack_bytes(values.to(torch.uint8), bits)
    fields = values.unflatten(-1, (words, per_word))
    packed = torch.zeros(fields.shape[:-1], dtype=torch.int64, device=values.device)
    for j in range(per_word):
        packed |= fields[..., j].to(torch.int64) << (bits * j)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_int32` for 4 and 8 bits, whose fields never straddle a byte: each byte is built in
    uint8 and the bytes are read as int32 words (little-endian: byte ``b`` holds bits ``8b..8b+7``), the
    same words with a few uint8 passes instead of int64 shifts of every field (13 s to pack one
    Qwen3-30B-A3B layer's experts before)."""
    if values.numel() == 0:
        return torch.zeros(*values.shape[:-1], values.shape[-1] * bits // 32, dtype=torch.int32)
    if bits == 4:
        pairs = values.unflatten(-1, (values.shape[-1] // 2, 2))
        values = pairs[..., 0] | (pairs[..., 1] << 4)
    rows = values.reshape(-1, values.shape[-1]).contiguous()  # plain strides, whatever size-1 dims had
    return rows.view(torch.int32).reshape(*values.shape[:-1], -1)


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``count`` values along the last dim, as uint8."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    per_word = _per_word(bits)
    if count > packed.shape[-1] * per_word:
        raise ValueError(
            f"{packed.shape[-1]} words hold at most {packed.shape[-1] * per_word} values, not {count}"
        )
    values = torch.empty(*packed.shape, per_word, dtype=torch.uint8, device=packed.device)
    for j in range(per_word):
        values[..., j] = (packed >> (bits * j)) & (2**bits - 1)
    return values.flatten(-2)[..., :count].contiguous()


def pack_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` (fp16) and ``g_idx`` in the GPTQ v1 layout.

    v1 stores ``zero - 1``, so a zero point of 0 (an asymmetric group that is all positive) has no v1
    encoding: it is refused rather than written as a value every reader would decode as 2**bits.
    """
    bits, per_word = qw.bits, _per_word(qw.bits)
    if qw.in_features % per_word or qw.out_features % per_word:
        raise ValueError(
            f"GPTQ packs {per_word} {bits}-bit values per int32 along both dims; "
            f"weight [{qw.out_features}, {qw.in_features}] does not divide"
        )
    if bool((qw.zero < 1).any()):
        raise ValueError(
            "GPTQ v1 stores zero-1 and cannot hold a zero point of 0; use compressed-tensors or sym"
        )
    leading = qw.codes.shape[:-2]
    g_idx = qw.group_index().to(torch.int32)
    return {
        "qweight": pack_int32(qw.codes, bits).transpose(-1, -2).contiguous(),
        "qzeros": pack_int32((qw.zero - 1).transpose(-1, -2), bits),
        "scales": _store_scale(qw.scale.transpose(-1, -2), torch.float16).contiguous(),
        "g_idx": g_idx.expand(*leading, qw.in_features).contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, *, sym: bool | None = None) -> QuantizedWeight:
    """Inverse of :func:`pack_gptq`; group size and act-order come from ``g_idx`` and ``scales``.

    ``sym`` defaults to whether every zero is ``2**(bits-1)``; a trivial ``g_idx`` becomes ``None``.
    """
    per_word = _per_word(bits)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features, out_features = qweight.shape[-2] * per_word, qweight.shape[-1]
    codes = unpack_int32(qweight.transpose(-1, -2).contiguous(), bits, in_features)
    zero = unpack_int32(qzeros, bits, out_features).to(torch.int32).transpose(-1, -2) + 1
    if "g_idx" not in tensors:
        raise ValueError("a GPTQ weight needs its g_idx to tell its group size")
    group_size, g_idx = _group_size_from_index(tensors["g_idx"].to(torch.int32), scales.shape[-2])
    if sym is None:
        sym = bool((zero == 2 ** (bits - 1)).all())
    return QuantizedWeight(
        codes=codes,
        scale=scales.transpose(-1, -2).float().contiguous(),
        zero=zero.contiguous(),
        bits=bits,
        group_size=group_size,
        sym=sym,
        g_idx=g_idx,
    )


def pack_compressed(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` tensors for one Linear (or a stack of them).

    ``scale_dtype`` is the dtype the model's weights are in (the library dequantizes in it). The
    library requires every group to be full and has no act-order here, so both are refused.
    """
    if qw.g_idx is not None and not bool((qw.g_idx == _plain_index(qw)).all()):
        raise ValueError(
            "compressed-tensors pack-quantized has no act-order group index; quantize without it"
        )
    if qw.n_groups > 1 and qw.in_features % qw.group_size:
        raise ValueError(
            f"compressed-tensors needs in_features ({qw.in_features}) divisible by the group size ({qw.group_size})"
        )
    mid = 2 ** (qw.bits - 1)
    if qw.sym and bool((qw.zero != mid).any()):
        raise ValueError(f"a symmetric weight must have every zero at {mid}")
    leading = qw.codes.shape[:-2]
    shape = torch.tensor([qw.out_features, qw.in_features], dtype=torch.int64)
    out = {
        "weight_packed": pack_int32(qw.codes, qw.bits),
        "weight_scale": _store_scale(qw.scale, scale_dtype).contiguous(),
        "weight_shape": shape.expand(*leading, 2).contiguous(),
    }
    if not qw.sym:
        out["weight_zero_point"] = (
            pack_int32(qw.zero.transpose(-1, -2), qw.bits).transpose(-1, -2).contiguous()
        )
    return out


def unpack_compressed(
    tensors: dict[str, torch.Tensor], bits: int, sym: bool, *, group_size: int | None = None
) -> QuantizedWeight:
    """Inverse of :func:`pack_compressed`; ``group_size`` defaults to ``in / n_groups`` (-1 for one)."""
    scale = tensors["weight_scale"]
    out_features, in_features = (int(v) for v in tensors["weight_shape"].reshape(-1, 2)[0])
    n_groups = scale.shape[-1]
    if group_size is None:
        group_size = -1 if n_groups == 1 else in_features // n_groups
    codes = unpack_int32(tensors["weight_packed"], bits, in_features)
    if sym:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32, device=scale.device)
    else:
        packed_zero = tensors["weight_zero_point"].transpose(-1, -2).contiguous()
        zero = unpack_int32(packed_zero, bits, out_features).to(torch.int32).transpose(-1, -2).contiguous()
    return QuantizedWeight(
        codes=codes, scale=scale.float(), zero=zero, bits=bits, group_size=group_size, sym=sym
    )


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit codes are packed, got {bits}")
    return 32 // bits


def _store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast scales to their file dtype, refusing ones that would become 0 or Inf there."""
    stored = scale.to(dtype)
    if not bool((torch.isfinite(stored) & (stored > 0)).all()):
        raise ValueError(f"a scale is 0 or out of range in {dtype}; quantize with scale_dtype={dtype}")
    return stored


def _plain_index(qw: QuantizedWeight) -> torch.Tensor:
    columns = torch.arange(qw.in_features, device=qw.codes.device, dtype=torch.int32)
    return columns // qw.effective_group_size


def _group_size_from_index(g_idx: torch.Tensor, n_groups: int) -> tuple[int, torch.Tensor | None]:
    """Group size (the largest group's column count) and ``g_idx``, or ``None`` if it is the plain map."""
    in_features = g_idx.shape[-1]
    if n_groups == 1:
        return -1, None if bool((g_idx == 0).all()) else g_idx
    rows = g_idx.reshape(-1, in_features).long()
    counts = torch.zeros(rows.shape[0], n_groups, dtype=torch.int64, device=g_idx.device)
    counts.scatter_add_(1, rows, torch.ones_like(rows))
    size = int(counts.max())
    plain = torch.arange(in_features, dtype=torch.int32, device=g_idx.device) // size
    return size, None if bool((g_idx == plain).all()) else g_idx
