"""Xiaomi's MiMo-V2-Flash (``mimo_v2_flash``): DeepSeek-V3's router (float32, sigmoid, with its
``e_score_correction_bias``) over routed experts only, after dense layers named by ``mlp_layer_types``;
sliding-window attention in five of every six layers, whose heads add a learned sink to the softmax
(stored as ``self_attn.attention_sink_bias``, ``self_attn.sinks`` at runtime), and value heads narrower
than query and key heads (``v_head_dim``).
"""

from __future__ import annotations

from .deepseek import LayerTypesFamily

MIMO_V2_FLASH = LayerTypesFamily(
    model_types=("mimo_v2_flash",),
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="n_routed_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
    renames=(("self_attn.attention_sink_bias", "self_attn.sinks"),),
)
