"""MiniMax-M2 (``minimax_m2``): Mixtral's per-expert names, a sigmoid router with a score correction bias.

The router's ``block_sparse_moe.e_score_correction_bias`` [E] sits beside ``block_sparse_moe.gate``;
transformers renames the whole block to ``mlp.``, so both move with it. The released checkpoints are FP8
blocks like DeepSeek-V3's, dequantized per layer on the fly.
"""

from .base import Family

MINIMAX_M2 = Family(
    model_types=("minimax_m2",),
    moe_block="block_sparse_moe",
    projections=("w1", "w3", "w2"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    renames=(("block_sparse_moe.", "mlp."),),
)
