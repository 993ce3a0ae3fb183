"""Meta's Llama 4 (``llama4``; ``llama4_text`` for its text model alone): Scout (16 experts in every
layer) and Maverick (128 experts in every other layer, dense MLPs between).

Each MoE block holds routed experts beside one shared expert, with top-1 routing by sigmoid scores.
Unlike other families, the score scales the token *into* the experts: transformers runs every expert
on every token multiplied by its score (zero where it was not routed) and sums what they return, so an
expert's calibration rows are its tokens times their scores. Releases and transformers' module store
the experts stacked and transposed, ``feed_forward.experts.gate_up_proj`` [E, H, 2I] (each expert's
gate columns, then its up columns) and ``feed_forward.experts.down_proj`` [E, I, H]; vLLM reads them so,
or per expert (``experts.{e}.gate_proj/up_proj/down_proj``, the names quantized experts are stored
under, as the field's quantized releases store them). The text model sits under
``language_model.model.`` (head ``language_model.lm_head``) beside a vision encoder
(``vision_model.``) and its projection (``multi_modal_projector.``), which every command carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class Llama4Family(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        """The config lists its MoE layers (from ``interleave_moe_layer_step``: all of Scout's, every
        other one of Maverick's)."""
        return layer in config.moe_layers

    @property
    def transformers_reads_per_expert(self) -> bool:
        """transformers swaps its stacked experts for one module per expert when it loads a
        compressed-tensors checkpoint of Llama 4, so it reads quantized outputs as they store them."""
        return True


LLAMA4 = Llama4Family(
    model_types=("llama4", "llama4_text"),
    moe_block="feed_forward",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    router="feed_forward.router",
    shared_experts="feed_forward.shared_expert",
    transposed_stacks=True,
    runtime_releases=True,
    block="feed_forward",
    scales_expert_inputs=True,
)
