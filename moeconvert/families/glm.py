"""GLM-4.5/4.6/4.7 (``glm4_moe``), GLM-4.5V/4.6V (``glm4v_moe``) and GLM-4.7-Flash (``glm4_moe_lite``):
DeepSeek-V3's MoE block.

Both keep V3's names and config keys (routed experts under ``mlp.experts``, ``mlp.shared_experts``, a
sigmoid router with ``e_score_correction_bias`` and group-limited routing) and ship an MTP layer after
the last decoder layer. ``glm4_moe`` has standard q/k/v attention (biased) and places its dense layers by
``first_k_dense_replace``; ``glm4_moe_lite`` has V3's MLA attention and places them by
``mlp_layer_types`` (one dense layer first unless the config says otherwise), which is what
transformers' model reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .deepseek import DEEPSEEK_COMMON, DeepseekFamily


@dataclass(frozen=True)
class GlmLiteFamily(DeepseekFamily):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return config.mlp_layer_types[layer] == "sparse"

    def routing_problem(self, config: Any) -> str | None:
        """``mlp_layer_types`` names each decoder layer's MLP, "dense" or "sparse"; any other list would
        fail in transformers' model, or build MLPs where the checkpoint holds experts."""
        kinds, depth = config.mlp_layer_types, config.num_hidden_layers
        if not isinstance(kinds, list) or len(kinds) != depth or not set(kinds) <= {"dense", "sparse"}:
            return (
                f"mlp_layer_types={kinds!r} (needs one of 'dense' or 'sparse' for each of the {depth} layers)"
            )
        return super().routing_problem(config)


GLM4_MOE = DeepseekFamily(model_types=("glm4_moe",), **DEEPSEEK_COMMON)
# GLM-4.5V/4.6V: GLM-4.5's text model in a vision-language checkpoint (``model.language_model.*`` beside
# ``model.visual.*``, which every command carries)
GLM4V_MOE = DeepseekFamily(model_types=("glm4v_moe", "glm4v_moe_text"), **DEEPSEEK_COMMON)
GLM4_MOE_LITE = GlmLiteFamily(model_types=("glm4_moe_lite",), **DEEPSEEK_COMMON)
