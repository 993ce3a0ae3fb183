"""Qwen1.5/Qwen2-MoE (one gated shared expert) and Qwen3-MoE (no shared expert).

Both place sparse blocks by ``decoder_sparse_step`` and exempt ``mlp_only_layers``, which then hold a
dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class QwenMoeFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return (
            layer not in (config.mlp_only_layers or [])
            and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0
        )


_QWEN_COMMON = dict(
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
)

QWEN2_MOE = QwenMoeFamily(model_types=("qwen2_moe",), shared_experts="mlp.shared_expert", **_QWEN_COMMON)
QWEN3_MOE = QwenMoeFamily(model_types=("qwen3_moe",), **_QWEN_COMMON)
