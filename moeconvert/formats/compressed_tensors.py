"""compressed-tensors ``pack-quantized``: vLLM's main quantized path, loaded by transformers 5 too.

Per quantized Linear ``X``: ``X.weight_packed`` int32 [out, in*bits/32] (unsigned codes, i.e. signed
codes + 2**(bits-1)), ``X.weight_scale`` [out, groups] in the model's dtype, ``X.weight_shape`` int64 [2],
and ``X.weight_zero_point`` (packed along the output dim) only for asymmetric schemes. Experts keep their
per-expert names, which vLLM's MoE loaders map onto their fused kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..quant.packing import pack_compressed
from ..quant.scheme import Scheme
from .base import QuantFormat, QuantizedModule
from .module_rules import rules_by_value, text_model_aliases, vllm_expert_names


def _weights_args(scheme: Scheme) -> dict[str, Any]:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.sym,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "block_structure": None,
        "dynamic": False,
        # None even after act-order GPTQ: its static groups store plainly (no g_idx), and vLLM releases
        # before 2026-04 split a TP-sharded MoE's scales wrongly for any actorder value
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


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
                "compressed-tensors needs input widths divisible by the group size "
                f"({in_features} % {scheme.group_size}); choose a --group-size that divides it, or -1 for "
                "per channel"
            )

    def loader_note(self, kept: Sequence[str]) -> str | None:
        """transformers (5.x) dequantizes a compressed-tensors MoE's experts while it stacks them, and
        takes every expert to be packed: experts kept in full precision leave it nothing to stack, and
        it fails to load the checkpoint. vLLM loads them."""
        if not any(".experts." in name for name in kept):
            return None
        return (
            "note: experts kept in full precision: vLLM loads this compressed-tensors output, "
            "transformers cannot (it takes every expert of a quantized MoE to be packed)"
        )

    def tensors(self, module: QuantizedModule) -> dict[str, torch.Tensor]:
        packed = pack_compressed(module.weight, module.source_dtype)
        return {f"{module.name}.{key}": value for key, value in packed.items()}

    def config(
        self, schemes: dict[str, Scheme], ignored: list[str], carried: Sequence[str] = ()
    ) -> dict[str, Any]:
        # one group per stored form: schemes that differ only in how they were solved share one
        stored = {name: (scheme.bits, scheme.group_size, scheme.sym) for name, scheme in schemes.items()}
        example = {stored[name]: scheme for name, scheme in sorted(schemes.items())}
        distinct = sorted(example)
        if len(distinct) == 1:
            targets = {distinct[0]: ["Linear"]}
        else:
            rules = rules_by_value({**dict.fromkeys(ignored), **stored}, experts_as_layer=False)
            targets = {key: ["re:" + rule for rule in rules[key]] for key in distinct}
        groups = {
            f"group_{number}": {
                "targets": targets[key],
                "weights": _weights_args(example[key]),
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
            for number, key in enumerate(distinct)
        }
        ignore = sorted(set(ignored) | vllm_expert_names(ignored) | text_model_aliases(ignored))
        ignore.extend("re:" + rule for rule in carried)
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "transform_config": {},
            "global_compression_ratio": None,
        }
