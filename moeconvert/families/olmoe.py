"""OLMoE: Qwen-style names, every layer sparse, expert size under ``intermediate_size``."""

from .base import Family

OLMOE = Family(
    model_types=("olmoe",),
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
)
