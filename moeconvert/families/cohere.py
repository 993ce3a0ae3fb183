"""Cohere's MoE models (``cohere2_moe``, Command A+): each decoder layer runs attention and its MLP side by
side on one normed input (``input_layernorm``; there is no norm between them) and adds both to the
residual stream. Experts are stored per expert under ``mlp.experts``, beside the router (``mlp.gate``)
and one shared MLP (``mlp.shared_experts``, ``num_shared_experts`` experts wide) whose output is summed
with or averaged into theirs. Dense layers are named by ``mlp_layer_types``; attention mixes
sliding-window and full layers (``layer_types``), and the head scales its logits (``logit_scale``).
"""

from __future__ import annotations

from .deepseek import LayerTypesFamily

COHERE2_MOE = LayerTypesFamily(
    model_types=("cohere2_moe",),
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    shared_experts="mlp.shared_experts",
    shared_count_key="num_shared_experts",
)
