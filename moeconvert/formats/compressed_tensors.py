"""compressed-tensors ``pack-quantized``: vLLM's main quantized path, loaded by transformers 5 too.

Per quantized Linear ``X``: ``X.weight_packed`` int32 [out, in*bits/32] (unsigned codes, i.e. signed
codes + 2**(bits-1)), ``X.weight_scale`` [out, groups] in the model's dtype, ``X.weight_shape`` int64 [2],
and ``X.weight_zero_point`` (packed along the output dim) only for asymmetric schemes. Experts keep their
per-expert names, which vLLM's MoE loaders map onto their fused kernels.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..quant.packing import pack_compressed
from ..quant.scheme import Scheme
from .base import QuantFormat, QuantizedModule


def _weights_args(scheme: Scheme) -> dict[str, Any]:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.sym,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": "static" if scheme.method == "gptq" and scheme.act_order else None,  # static groups
        "observer": "minmax",
        "observer_kwargs": {},
    }


def generalize(name: str) -> str:
    """A regex matching ``name`` in every layer and expert: numbers become ``\\d+``."""
    escaped = re.escape(name)  # "model\\.layers\\.12\\.mlp..."
    return "re:^" + re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", escaped) + "$"


class CompressedTensorsFormat(QuantFormat):
    name = "compressed-tensors"
    scale_dtype = None  # the model's dtype

    def check(self, scheme: Scheme, in_features: int) -> None:
        if scheme.group_index:
            raise ValueError(
                "compressed-tensors pack-quantized has no act-order group index; drop --dynamic-groups, "
                "use --format gptq, or add --no-act-order"
            )
        if scheme.group_size != -1 and in_features % scheme.group_size:
            raise ValueError(
                f"compressed-tensors needs input widths divisible by the group size ({in_features} % {scheme.group_size}); "
                "choose a --group-size that divides it, or -1 for per channel"
            )

    def tensors(self, module: QuantizedModule) -> dict[str, torch.Tensor]:
        packed = pack_compressed(module.weight, module.source_dtype)
        return {f"{module.name}.{key}": value for key, value in packed.items()}

    def config(self, schemes: dict[str, Scheme], ignored: list[str]) -> dict[str, Any]:
        distinct = sorted(set(schemes.values()), key=lambda s: (s.bits, s.group_size, s.sym))
        groups: dict[str, Any] = {}
        for number, scheme in enumerate(distinct):
            if len(distinct) == 1:
                targets = ["Linear"]
            else:
                targets = sorted({generalize(n) for n, s in schemes.items() if s == scheme})
            groups[f"group_{number}"] = {
                "targets": targets,
                "weights": _weights_args(scheme),
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": sorted(ignored),
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "transform_config": {},
            "global_compression_ratio": None,
        }
