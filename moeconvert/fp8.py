"""FP8 sources, dequantized one layer at a time: two on-disk conventions.

Blocks (DeepSeek-V3's, ``quant_method: fp8``): a Linear has ``X.weight`` float8_e4m3fn [out, in] and
``X.weight_scale_inv`` float32 [ceil(out/b0), ceil(in/b1)]: one multiplier per b0 x b1 block, the grid
rounded up at ragged edges, with ``(b0, b1)`` from ``config.json: quantization_config.weight_block_size``.
The dequantized weight is ``fp8 * scale`` with each scale broadcast over its block and the edge blocks
cropped to the weight.

Rows (FBGEMM's, ``quant_method: fbgemm_fp8``, Meta's FP8 Llama 4 releases): an FP8 tensor ``T`` has a
float32 ``T_scale`` with one multiplier per output row: [out, 1] for a Linear's ``weight`` [out, in]; for
Llama 4's transposed expert stacks, [E, 1, 2I] for ``gate_up_proj`` [E, H, 2I] and [E, H, 1] for
``down_proj`` [E, I, H], as transformers' FBGEMM experts module holds them. Tensors left in full
precision (``modules_to_not_convert``) are told apart by their dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ShardedReader
from .errors import CorruptCheckpointError, UnsupportedModelError

SCALE_SUFFIX = ".weight_scale_inv"
ROW_SCALE_SUFFIX = "_scale"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Fp8Source:
    """How an FP8 checkpoint scales its weights: per ``block`` (rows, columns), or per output row where
    ``block`` is None (see the module docstring)."""

    block: tuple[int, int] | None


def fp8_source(config: dict[str, Any]) -> Fp8Source | None:
    """The FP8 convention of a checkpoint read dequantized, or None for any other checkpoint."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "fbgemm_fp8":
        return Fp8Source(None)
    if method != "fp8":
        return None
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CorruptCheckpointError(
            f"quantization_config.weight_block_size must be two positive ints, got {block}"
        )
    return Fp8Source((block[0], block[1]))


def without_fp8_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for the dequantized model: the source's fp8 ``quantization_config`` no longer applies."""
    if fp8_source(config) is None:
        return config
    return {k: v for k, v in config.items() if k != "quantization_config"}


def quantization_method(config: dict[str, Any]) -> str | None:
    """The ``quant_method`` of a checkpoint stored quantized (GPTQ, AWQ, compressed-tensors, this tool's
    own output), or None for full precision and for FP8 blocks, which are read dequantized and whose
    weights keep their shapes."""
    quant = config.get("quantization_config")
    if not quant or fp8_source(config) is not None:
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


def dequantize_rowwise_fp8(
    name: str, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``fp8 * scale`` with one scale per output row (the module docstring's shapes)."""
    down = name.endswith("experts.down_proj")  # its rows are the stack's last dimension, its scale [E, H, 1]
    expected = (weight.shape[0], 1) if weight.dim() == 2 else (weight.shape[0], 1, weight.shape[-1])
    stored = (expected[0], expected[2], 1) if down and weight.dim() == 3 else expected
    if tuple(scale.shape) != stored:
        raise CorruptCheckpointError(
            f"FP8 row scales {name}{ROW_SCALE_SUFFIX} are {list(scale.shape)}, which do not fit a "
            f"{list(weight.shape)} weight (expected {list(stored)})"
        )
    per_row = scale.transpose(-2, -1) if down and weight.dim() == 3 else scale
    return (weight.float() * per_row.float()).to(dtype)


def dequantize_tensors(
    tensors: dict[str, torch.Tensor], source: Fp8Source, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Replace every (fp8 weight, scale) pair of a layer by its dequantized weight; other tensors pass."""
    if source.block is None:
        return _dequantize_rows(tensors, dtype)
    block = source.block
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name[: -len(".weight")] + SCALE_SUFFIX) if name.endswith(".weight") else None
        if scale is not None:
            out[name] = dequantize_block_fp8(tensor, scale, block, dtype)
        elif tensor.dtype in FP8_DTYPES:
            raise CorruptCheckpointError(f"{name} is FP8 but has no {SCALE_SUFFIX} tensor")
        else:
            out[name] = tensor
    orphans = [
        n for n in tensors if n.endswith(SCALE_SUFFIX) and n.replace(SCALE_SUFFIX, ".weight") not in tensors
    ]
    if orphans:
        raise CorruptCheckpointError(f"{orphans[0]} has no matching weight")
    return out


def _dequantize_rows(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """:func:`dequantize_tensors` for row scales: every FP8 tensor with its ``_scale``; a tensor of
    another dtype whose name merely ends so (Gemma 4's ``per_expert_scale``) is no scale."""
    fp8 = {name for name, tensor in tensors.items() if tensor.dtype in FP8_DTYPES}
    scales = {name + ROW_SCALE_SUFFIX for name in fp8}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in scales:
            continue
        if name not in fp8:
            out[name] = tensor
        elif name + ROW_SCALE_SUFFIX not in tensors:
            raise CorruptCheckpointError(f"{name} is FP8 but has no {name}{ROW_SCALE_SUFFIX} tensor")
        else:
            out[name] = dequantize_rowwise_fp8(name, tensor, tensors[name + ROW_SCALE_SUFFIX], dtype)
    return out


def scale_names(dtypes: dict[str, str], source: Fp8Source) -> set[str]:
    """The scales among a checkpoint's tensors, given each tensor's safetensors dtype (``F8_E4M3``): they
    belong to their weights and are no parameters of the model the source dequantizes to."""
    if source.block is not None:
        return {
            n for n in dtypes if n.endswith(SCALE_SUFFIX) and n.replace(SCALE_SUFFIX, ".weight") in dtypes
        }
    return {n + ROW_SCALE_SUFFIX for n, dtype in dtypes.items() if dtype.startswith("F8_")} & dtypes.keys()


def source_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype dequantized weights are written in: the config's own, bf16 by default."""
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16}.get(str(name), torch.bfloat16)


class DequantizingReader(ShardedReader):
    """A reader that hands out FP8 weights already dequantized (and hides their scales), so every pass
    sees an ordinary bf16 checkpoint, one layer at a time."""

    def __init__(self, folder: Path, source: Fp8Source, dtype: torch.dtype) -> None:
        super().__init__(folder)
        self.source, self.dtype = source, dtype

    def get_many(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return dequantize_tensors(super().get_many(names), self.source, self.dtype)

    def meta_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return dequantize_tensors(super().meta_tensors(names), self.source, self.dtype)


def open_reader(folder: Path, config: dict[str, Any]) -> ShardedReader:
    """The checkpoint reader for ``folder``: dequantizing for FP8 sources."""
    source = fp8_source(config)
    if source is None:
        return ShardedReader(folder)
    return DequantizingReader(folder, source, source_dtype(config))


def header_reader(metas: dict, config: dict[str, Any]) -> ShardedReader:
    """A header-only reader (planning without data) that sees FP8 sources as dequantized, like
    :func:`open_reader`."""
    from .checkpoint import HeaderReader

    source = fp8_source(config)
    if source is None:
        return HeaderReader(metas)
    dtype = source_dtype(config)
    return HeaderReader(metas, lambda tensors: dequantize_tensors(tensors, source, dtype))
