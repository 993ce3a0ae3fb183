"""Google's Gemma 4 MoE (``gemma4``; ``gemma4_text`` for its text model alone), e.g. Gemma 4 26B-A4B.

Each layer runs a dense MLP and, beside it, routed experts, both on the residual stream after
attention, and adds their normed outputs. The experts and their router hang off the decoder layer
itself, not off an MoE block: ``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I] and
``router.proj`` (the router's Linear, after a norm and a learned scale of its own). Its releases store
the experts in that runtime layout, which transformers reads as it is and vLLM splits per expert
(``experts.{e}.gate_proj/up_proj/down_proj``, the names quantized experts are stored under); the text
model sits under ``model.language_model.`` beside a vision encoder (``model.vision_tower.``,
``model.embed_vision.``), which every command carries.

The dense Gemma 4 models (``enable_moe_block`` false) have no experts to convert. Two features of the
small dense ones are refused by name: per-layer embeddings, a second embedding table the model feeds
every layer, and keys and values one layer computes and later layers reuse; a pass over one layer at a
time holds neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class Gemma4Family(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return bool(getattr(config, "enable_moe_block", False))

    def routing_problem(self, config: Any) -> str | None:
        if not getattr(config, "enable_moe_block", False):
            return "enable_moe_block is false: a dense model, with no experts to convert"
        if getattr(config, "hidden_size_per_layer_input", 0):
            return "hidden_size_per_layer_input > 0: per-layer embeddings are not supported"
        if getattr(config, "num_kv_shared_layers", 0):
            return (
                "num_kv_shared_layers > 0: layers that reuse other layers' keys and values are not supported"
            )
        return super().routing_problem(config)


GEMMA4 = Gemma4Family(
    model_types=("gemma4", "gemma4_text"),
    moe_block="",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="top_k_experts",
    expert_size_key="moe_intermediate_size",
    router="router.proj",
    runtime_releases=True,
    block="",
)
