"""Arcee's Trinity models (``afmoe``): a sigmoid router nested in the MoE block (``mlp.router.gate``) with
its bias beside it (``mlp.expert_bias``), shared experts under ``mlp.shared_experts``, dense layers first
(``num_dense_layers``), sliding-window attention in all but every ``global_attn_every_n_layers``-th
layer, and norms on both sides of attention and MLP (``pre_mlp_layernorm``/``post_mlp_layernorm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import QWEN_STYLE, Family


@dataclass(frozen=True)
class AfmoeFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return layer >= (config.num_dense_layers or 0)


AFMOE = AfmoeFamily(
    model_types=("afmoe",),
    **QWEN_STYLE,
    router="mlp.router.gate",
    shared_experts="mlp.shared_experts",
    shared_count_key="num_shared_experts",
)
