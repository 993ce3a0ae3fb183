"""Liquid AI's LFM2-MoE (``lfm2_moe``): its MoE block is ``feed_forward``, in the original layout and at
runtime alike, with Mixtral's expert names (``feed_forward.experts.{e}.w1/w3/w2``: gate, up, down), a
sigmoid router (``feed_forward.gate``) and its bias beside it (``feed_forward.expert_bias``), after
``num_dense_layers`` dense layers. Most layers mix tokens with a short convolution (``conv``), the rest
with attention (``self_attn``), as ``layer_types`` says; the final norm is ``model.embedding_norm``.

The convolutions' projections stay in full precision: vLLM builds them without quantization, and their
gates multiply 4-bit errors (on the tiny model, quantizing them with the rest makes the mean KL of
round-to-nearest 2.4x that of keeping them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class Lfm2Family(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return layer >= config.num_dense_layers


LFM2_MOE = Lfm2Family(
    model_types=("lfm2_moe",),
    moe_block="feed_forward",
    projections=("w1", "w3", "w2"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
    router="feed_forward.gate",
    block="feed_forward",
    keep=(r"\.conv\.",),
)
