"""ERNIE-4.5 MoE (``ernie4_5_moe``): routed and shared experts under DeepSeek's names, placed by range.

Sparse blocks sit in layers ``moe_layer_start_index`` to ``moe_layer_end_index``, every
``moe_layer_interval``-th; the others hold a dense MLP. The router keeps its weight in float32 and a
score correction bias [1, E] in ``mlp.moe_statics``, which transformers moves under the router
(``mlp.gate.moe_statics``); both are router state, kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class ErnieFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return (
            (layer + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= layer <= config.moe_layer_end_index
        )


ERNIE4_5_MOE = ErnieFamily(
    model_types=("ernie4_5_moe",),
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="moe_num_experts",
    top_k_key="moe_k",
    expert_size_key="moe_intermediate_size",
    renames=(("mlp.moe_statics.", "mlp.gate.moe_statics."),),
    shared_experts="mlp.shared_experts",
    shared_count_key="moe_num_shared_experts",
)
