"""FP8 block-quantized sources (DeepSeek-V3's on-disk convention), dequantized one layer at a time.

A Linear stored this way has ``X.weight`` float8_e4m3fn [out, in] and ``X.weight_scale_inv`` float32
[ceil(out/b0), ceil(in/b1)]: one multiplier per b0 x b1 block, the grid rounded up at ragged edges, with
``(b0, b1)`` from ``config.json: quantization_config.weight_block_size``. The dequantized weight is
``fp8 * scale`` with each scale broadcast over its block and the edge blocks cropped to the weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ShardedReader
from .errors import CorruptCheckpointError, UnsupportedModelError

SCALE_SUFFIX = ".weight_scale_inv"


def fp8_block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The block size of an FP8 block-quantized checkpoint, or None for any other checkpoint."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CorruptCheckpointError(
            f"quantization_config.weight_block_size must be two positive ints, got {block}"
        )
    return block[0], block[1]


def without_fp8_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for the dequantized model: the source's fp8 ``quantization_config`` no longer applies."""
    if fp8_block_size(config) is None:
        return config
    return {k: v for k, v in config.items() if k != "quantization_config"}


def quantization_method(config: dict[str, Any]) -> str | None:
    """The ``quant_method`` of a checkpoint stored quantized (GPTQ, AWQ, compressed-tensors, this tool's
    own output), or None for full precision and for FP8 blocks, which are read dequantized and whose
    weights keep their shapes."""
    quant = config.get("quantization_config")
    if not quant or fp8_block_size(config) is not None:
        return None
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"


def full_precision_config(config: dict[str, Any], command: str) -> dict[str, Any]:
    """config.json of a source that ``command`` can read: full precision, or FP8 blocks it dequantizes as
    it reads them (see :func:`without_fp8_config`). An otherwise quantized checkpoint is refused by name
    here, before a layer is read: requantizing its rounded weights would compound the error, and its
    packed tensors are not weights."""
    method = quantization_method(config)
    if method is not None:
        raise UnsupportedModelError(
            f"the checkpoint is already quantized (quantization_config.quant_method {method!r}): "
            f"{command} needs its full-precision original"
        )
    return without_fp8_config(config)


def dequantize_block_fp8(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != expected:
        raise CorruptCheckpointError(
            f"FP8 scale grid {list(scale.shape)} does not fit a {list(weight.shape)} weight in {block} blocks "
            f"(expected {list(expected)})"
        )
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * full).to(dtype)


def dequantize_tensors(
    tensors: dict[str, torch.Tensor], block: tuple[int, int], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Replace every (fp8 weight, scale) pair of a layer by its dequantized weight; other tensors pass."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name[: -len(".weight")] + SCALE_SUFFIX) if name.endswith(".weight") else None
        if scale is not None:
            out[name] = dequantize_block_fp8(tensor, scale, block, dtype)
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CorruptCheckpointError(f"{name} is FP8 but has no {SCALE_SUFFIX} tensor")
        else:
            out[name] = tensor
    orphans = [
        n for n in tensors if n.endswith(SCALE_SUFFIX) and n.replace(SCALE_SUFFIX, ".weight") not in tensors
    ]
    if orphans:
        raise CorruptCheckpointError(f"{orphans[0]} has no matching weight")
    return out


def source_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype dequantized weights are written in: the config's own, bf16 by default."""
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16}.get(str(name), torch.bfloat16)


class DequantizingReader(ShardedReader):
    """A reader that hands out FP8 block-quantized weights already dequantized (and hides their scales),
    so every pass sees an ordinary bf16 checkpoint, one layer at a time."""

    def __init__(self, folder: Path, block: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__(folder)
        self.block, self.dtype = block, dtype

    def get_many(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return dequantize_tensors(super().get_many(names), self.block, self.dtype)

    def meta_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return dequantize_tensors(super().meta_tensors(names), self.block, self.dtype)


def open_reader(folder: Path, config: dict[str, Any]) -> ShardedReader:
    """The checkpoint reader for ``folder``: dequantizing for FP8 block-quantized sources."""
    block = fp8_block_size(config)
    if block is None:
        return ShardedReader(folder)
    return DequantizingReader(folder, block, source_dtype(config))


def header_reader(metas: dict, config: dict[str, Any]) -> ShardedReader:
    """A header-only reader (planning without data) that sees FP8 sources as dequantized, like
    :func:`open_reader`."""
    from .checkpoint import HeaderReader

    block = fp8_block_size(config)
    if block is None:
        return HeaderReader(metas)
    dtype = source_dtype(config)
    return HeaderReader(metas, lambda tensors: dequantize_tensors(tensors, block, dtype))
