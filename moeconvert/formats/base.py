"""What an output format decides: tensor names and bytes for a quantized Linear, and config entries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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


# Group sizes serving engines' 4- and 8-bit kernels take (vLLM's Marlin: -1, 32, 64, 128), largest first.
SERVED_GROUP_SIZES = (128, 64, 32)


def fitting_group_size(scheme: Scheme, widths: Sequence[int], fmt: QuantFormat) -> int | None:
    """The largest group size below ``scheme``'s that serving kernels take and ``fmt`` can store for
    every input width in ``widths``, or None: what to suggest when a width does not fit the groups."""
    for group in SERVED_GROUP_SIZES:
        if scheme.group_size != -1 and group >= scheme.group_size:
            continue
        candidate = replace(scheme, group_size=group)
        try:
            for width in widths:
                fmt.check(candidate, width)
        except ValueError:
            continue
        return group
    return None
