"""JetBrains' Mellum2 (``mellum``): Qwen3-MoE's block (a softmax router, routed experts only) with dense
layers named by ``mlp_layer_types``, sliding-window and full attention (``layer_types``), and an MTP
block beside the model (``mtp.*``), carried as it is.
"""

from __future__ import annotations

from .deepseek import LayerTypesFamily

MELLUM = LayerTypesFamily(
    model_types=("mellum",),
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
)
