"""DeepSeek-V2 and V3: dense MLPs before ``first_k_dense_replace``, then routed + shared experts.

V3 adds the router's ``e_score_correction_bias`` (stored as ``mlp.gate.e_score_correction_bias``) and
group-limited routing; both are router state, kept as they are. dots.llm1 (``dots1``) is V3's MoE block
with plain q/k/v attention (q and k normed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class DeepseekFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return layer >= config.first_k_dense_replace

    def num_shared_experts(self, config: Any) -> int:
        return int(config.n_shared_experts or 0)

    def routing_problem(self, config: Any) -> str | None:
        """Group-limited routing also picks ``topk_group`` of ``n_group`` equal groups of experts first."""
        problem = super().routing_problem(config)
        groups, picked = getattr(config, "n_group", None), getattr(config, "topk_group", None)
        if problem or not groups or picked is None:
            return problem
        experts, top_k = self.num_experts(config), self.top_k(config)
        if experts % groups or not 1 <= picked <= groups or top_k > picked * (experts // groups):
            return (
                f"n_group={groups}, topk_group={picked} with {experts} experts and top-{top_k} (group-limited "
                "routing needs equal groups, 1 <= topk_group <= n_group and top-k within the picked groups)"
            )
        return None


DEEPSEEK_COMMON = dict(  # names and keys, shared with GLM (glm.py)
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="n_routed_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
    shared_experts="mlp.shared_experts",
)

DEEPSEEK_V2 = DeepseekFamily(model_types=("deepseek_v2",), **DEEPSEEK_COMMON)
DEEPSEEK_V3 = DeepseekFamily(model_types=("deepseek_v3",), **DEEPSEEK_COMMON)
DOTS1 = DeepseekFamily(model_types=("dots1",), **DEEPSEEK_COMMON)
