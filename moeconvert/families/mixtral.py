"""Mixtral (and its per-expert names w1/w3/w2 under ``block_sparse_moe``)."""

from .base import Family

MIXTRAL = Family(
    model_types=("mixtral",),
    moe_block="block_sparse_moe",
    projections=("w1", "w3", "w2"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    renames=(("block_sparse_moe.gate.", "mlp.gate."),),
)
