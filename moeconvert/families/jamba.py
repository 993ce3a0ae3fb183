"""AI21's Jamba (``jamba``): Mamba layers with attention every ``attn_layer_period`` layers, and routed
experts in place of the dense MLP every ``expert_layer_period`` layers (from ``expert_layer_offset``).
Its MoE block is ``feed_forward``, in the original layout and at runtime alike, with Qwen-MoE's expert
names (``feed_forward.experts.{e}.gate_proj/up_proj/down_proj``) and its router at
``feed_forward.router``; the norm before it is ``pre_ff_layernorm``, the final one ``final_layernorm``,
and its attention has no rotary embeddings (the Mamba layers carry the positions).

The Mamba mixers' projections stay in full precision, as Granite 4.0-H's do: they feed a recurrent state
in which 4-bit errors build up along the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class JambaFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return config.layers_num_experts[layer] > 1


JAMBA = JambaFamily(
    model_types=("jamba",),
    moe_block="feed_forward",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    router="feed_forward.router",
    block="feed_forward",
    keep=(r"\.mamba\.",),
)
