"""MiniCPM5-MoE (``minicpm5_moe``): DeepSeek-V3's MoE block (a float32 sigmoid router with its
``e_score_correction_bias``, shared experts under ``mlp.shared_experts``) after dense layers named by
``mlp_layer_types``, and gated attention: ``self_attn.q_proj`` holds each head's query and output gate
([2 × heads × head_dim, H]), which transformers calls ``self_attn.q_gate_proj`` at runtime.
"""

from __future__ import annotations

from .deepseek import DEEPSEEK_COMMON, LayerTypesFamily

MINICPM5_MOE = LayerTypesFamily(
    model_types=("minicpm5_moe",),
    renames=(("self_attn.q_proj.", "self_attn.q_gate_proj."),),
    **DEEPSEEK_COMMON,
)
