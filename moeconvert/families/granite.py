"""IBM Granite 4.0's hybrid MoE (``granitemoehybrid``): most layers mix tokens with Mamba-2 (``mamba``),
the rest with attention (``self_attn``, without rotary embeddings in the H releases), as ``layer_types``
says; every layer adds a dense shared MLP (``shared_mlp``, its gate and up projections one Linear) to
its routed experts, and scales its residual updates, its embeddings and its logits.

Its releases store each layer's experts already stacked, in the runtime orientation but under names of
their own: ``block_sparse_moe.input_linear.weight`` [E, 2I, H] (gate rows first) and
``block_sparse_moe.output_linear.weight`` [E, H, I], with the router at
``block_sparse_moe.router.layer.weight``. ``fuse`` renames them to transformers' runtime names and
``unfuse`` back. Quantized outputs store experts one per expert, as
``block_sparse_moe.experts.{e}.gate_proj/up_proj/down_proj``: the names vLLM's Granite loader reads
quantized experts under. transformers reads this model's experts only stacked.

The Mamba mixers' projections stay in full precision: they feed a recurrent state, in which 4-bit
errors build up along the sequence, as Qwen3-Next's linear attention keeps them (quantized with the
rest, they raise the tiny model's mean 4-bit KL 17-18x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class GraniteFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return int(config.num_local_experts or 0) > 0


GRANITEMOEHYBRID = GraniteFamily(
    model_types=("granitemoehybrid",),
    moe_block="block_sparse_moe",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    renames=(
        ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
        ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
        ("block_sparse_moe.router.layer.", "block_sparse_moe.router."),
    ),
    router="block_sparse_moe.router",
    shared_experts="shared_mlp",
    keep=(r"\.mamba\.",),
    released_stacks=True,
    block="block_sparse_moe",
)
