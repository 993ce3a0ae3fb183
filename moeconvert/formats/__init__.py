"""Output formats for quantized checkpoints: tensor names, packing and config entries."""

from __future__ import annotations

from .base import QuantFormat
from .compressed_tensors import CompressedTensorsFormat
from .fused import FusedFormat, load_fused
from .gptq import GptqFormat

FORMATS: dict[str, type[QuantFormat]] = {
    "compressed-tensors": CompressedTensorsFormat,
    "gptq": GptqFormat,
    "fused": FusedFormat,
}


def get_format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]()


__all__ = ["FORMATS", "QuantFormat", "get_format", "load_fused"]
