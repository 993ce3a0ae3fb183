"""Tencent's Hunyuan-A13B (``hunyuan_v1_moe``): a softmax router whose Linear sits inside the gate module
(``mlp.gate.wg``, float32), one shared MLP in every layer (``mlp.shared_mlp``), experts as wide as it
(``intermediate_size``), and q and k normed per head (``query_layernorm``/``key_layernorm``). Its
releases list the top-k once per layer (``moe_topk``: [8, 8, ...]).

Hy3 (``hy_v3``) nests a sigmoid router in the MoE block (``mlp.router.gate``, transformers' ``mlp.gate``),
keeps its bias beside it (``mlp.expert_bias``, transformers' ``mlp.e_score_correction_bias``) and its
shared experts under ``mlp.shared_mlp`` (``mlp.shared_experts``), after dense layers named by
``mlp_layer_types``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import QWEN_STYLE, Family
from .deepseek import LayerTypesFamily


@dataclass(frozen=True)
class HunyuanFamily(Family):
    def top_k(self, config: Any) -> int:
        """The top-k of every layer: one number, or a list of them that must agree (a per-layer top-k
        would change what every estimate and calibration setting here means)."""
        value = getattr(config, self.top_k_key)
        values = set(value) if isinstance(value, list) else {value}
        return int(values.pop()) if len(values) == 1 else -1

    def routing_problem(self, config: Any) -> str | None:
        if self.top_k(config) < 0:
            value = getattr(config, self.top_k_key)
            return f"{self.top_k_key}={value!r} (a top-k that differs between layers is not supported)"
        return super().routing_problem(config)


HUNYUAN_V1_MOE = HunyuanFamily(
    model_types=("hunyuan_v1_moe",),
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_experts",
    top_k_key="moe_topk",
    expert_size_key="intermediate_size",
    router="mlp.gate.wg",
    shared_experts="mlp.shared_mlp",
)

HY_V3 = LayerTypesFamily(
    model_types=("hy_v3",),
    **QWEN_STYLE,
    shared_experts="mlp.shared_experts",
    shared_count_key="num_shared_experts",
    renames=(
        ("mlp.router.gate.", "mlp.gate."),
        ("mlp.expert_bias", "mlp.e_score_correction_bias"),
        ("mlp.shared_mlp.", "mlp.shared_experts."),
    ),
)
