"""The AutoGPTQ checkpoint format ("v1"), as vLLM's GPTQ (Marlin) MoE path and TGI read it.

Per quantized Linear ``X``: ``X.qweight`` int32 [in*bits/32, out] packed along the input dim, lowest bits
first; ``X.qzeros`` int32 [groups, out*bits/32] holding zero-1; ``X.scales`` fp16 [groups, out];
``X.g_idx`` int32 [in]. ``quantize_config.json`` repeats ``config.json``'s ``quantization_config``.
Modules kept in full precision and those off the most common scheme get GPTQModel/vLLM ``dynamic``
overrides: ``"-:regex"`` keeps matching modules in full precision, ``"+:regex"`` gives them their own
bits/group size; loaders apply them in order, the first match deciding (regexes: ``module_rules``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from ..quant.packing import pack_gptq
from ..quant.scheme import Scheme
from .base import QuantFormat, QuantizedModule
from .module_rules import rules_by_value


class GptqFormat(QuantFormat):
    name = "gptq"
    scale_dtype = torch.float16

    def check(self, scheme: Scheme, in_features: int) -> None:
        if not scheme.sym:
            raise ValueError(
                "the GPTQ v1 format stores zero-1 and cannot hold every asymmetric zero; use --sym or "
                "--format compressed-tensors"
            )
        if in_features * scheme.bits % 32:
            raise ValueError(
                f"GPTQ packing needs in_features*bits divisible by 32 (in_features={in_features})"
            )

    def tensors(self, module: QuantizedModule) -> dict[str, torch.Tensor]:
        return {f"{module.name}.{key}": value for key, value in pack_gptq(module.weight).items()}

    def config(
        self, schemes: dict[str, Scheme], ignored: list[str], carried: Sequence[str] = ()
    ) -> dict[str, Any]:
        stored = {name: (scheme.bits, scheme.group_size) for name, scheme in schemes.items()}
        counts = Counter(stored.values())
        main_key = max(sorted(counts), key=counts.__getitem__)  # ties: the fewest bits
        main = next(schemes[name] for name in sorted(schemes) if stored[name] == main_key)
        rules = rules_by_value({**dict.fromkeys(ignored), **stored}, experts_as_layer=True)
        dynamic: dict[str, dict[str, Any]] = {}
        for rule in carried:
            dynamic["-:" + rule] = {}
        for rule in rules.get(None, []):
            dynamic[f"-:{rule}"] = {}
        for bits, group_size in sorted(counts):
            if (bits, group_size) != main_key:
                for rule in rules[bits, group_size]:
                    dynamic[f"+:{rule}"] = {"bits": bits, "group_size": group_size}
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": main.bits,
            "group_size": main.group_size,
            "desc_act": main.group_index,  # static groups keep the plain column order
            "sym": main.sym,
            "damp_percent": main.damp,
            "true_sequential": True,
            "static_groups": main.method == "gptq" and main.static_groups,
            "lm_head": False,
        }
        if dynamic:
            config["dynamic"] = dynamic
        return config

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, str]:
        return {"quantize_config.json": json.dumps(quantization_config, indent=2) + "\n"}
