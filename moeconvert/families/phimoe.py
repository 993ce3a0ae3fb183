"""Phi-3.5-MoE: Mixtral's names on disk; transformers 5 calls its router ``mlp.router``."""

from .base import Family

PHIMOE = Family(
    model_types=("phimoe",),
    moe_block="block_sparse_moe",
    projections=("w1", "w3", "w2"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    renames=(("block_sparse_moe.gate.", "mlp.router."),),
    router="mlp.router",
)
