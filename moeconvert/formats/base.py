"""What an output format decides: tensor names and bytes for a quantized Linear, and config entries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..quant.rtn import QuantizedWeight
from ..quant.scheme import Scheme


@dataclass(frozen=True)
class QuantizedModule:
    """One quantized Linear of the output: its module name (checkpoint naming) and its codes."""

    name: str  # e.g. "model.layers.0.block_sparse_moe.experts.3.w1"
    weight: QuantizedWeight  # [out, in]
    scheme: Scheme
    source_dtype: torch.dtype


class QuantFormat:
    name = ""
    #: "experts" keeps per-expert checkpoint names (vLLM's loaders); "fused" writes transformers 5's
    #: runtime names with one stacked entry per expert projection
    layout = "experts"
    #: dtype scales are stored in (None: the source weight's dtype); rounding decisions use it
    scale_dtype: torch.dtype | None = None

    def check(self, scheme: Scheme, in_features: int) -> None:
        """Raise ValueError if ``scheme`` cannot be stored for a Linear with ``in_features`` inputs."""

    def tensors(self, module: QuantizedModule) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loader_note(self, kept: Sequence[str]) -> str | None:
        """A note for the user when a known loader cannot take this output with ``kept`` (Linear modules
        kept in full precision beside quantized ones), or None."""
        return None

    def config(
        self, schemes: dict[str, Scheme], ignored: list[str], carried: Sequence[str] = ()
    ) -> dict[str, Any]:
        """``quantization_config`` for config.json. ``schemes``: module name -> scheme of every quantized
        module; ``ignored``: Linear modules kept in full precision; ``carried``: regexes of the MTP
        modules carried whole in full precision (DeepSeek-V3's and GLM's decoder layers past
        ``num_hidden_layers``, Qwen3-Next's ``mtp.*``), which engines that run them must not take for
        quantized."""
        raise NotImplementedError

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, str]:
        """Additional JSON files the format's readers expect (file name -> text)."""
        return {}
