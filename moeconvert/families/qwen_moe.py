"""Qwen1.5/Qwen2-MoE (one gated shared expert), Qwen3-MoE (none) and Qwen3-Next (hybrid attention).

All place sparse blocks by ``decoder_sparse_step`` and exempt ``mlp_only_layers``, which then hold a
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
# Qwen3-Next: Qwen2-MoE's gated shared expert, and three of four layers with gated linear attention
# (``linear_attn``) in place of ``self_attn``. Its projections feed a recurrent state, where 4-bit
# errors build up over the sequence (mean KL 9x that of keeping them, on the tiny model): they stay in
# full precision, as published quantizations of the model keep them.
QWEN3_NEXT = QwenMoeFamily(
    model_types=("qwen3_next",),
    shared_experts="mlp.shared_expert",
    keep=(r"\.linear_attn\.",),
    **_QWEN_COMMON,
)
