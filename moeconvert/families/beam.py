"""Reflection's Beam (``beam``): DeepSeek-V3's router (float32, sigmoid, with its
``e_score_correction_bias`` and group-limited routing) over routed experts only, after dense layers
named by ``mlp_layer_types``; sliding-window attention in most layers; norms on both sides of attention
and MLP, whose outputs join the residual stream weighed by depth; and a soft cap on the logits
(``final_logit_softcapping``), which every forward pass here applies as the model does.
"""

from __future__ import annotations

from .base import QWEN_STYLE
from .deepseek import LayerTypesFamily

BEAM = LayerTypesFamily(
    model_types=("beam",),
    **QWEN_STYLE,
)
