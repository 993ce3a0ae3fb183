"""K-EXAONE (``exaone_moe``): DeepSeek-V3's MoE block (a sigmoid router whose ``e_score_correction_bias``
is stored beside it, as ``mlp.e_score_correction_bias``; shared experts under ``mlp.shared_experts``)
under its own config keys, dense layers named by
``mlp_layer_types``, and attention that mixes sliding-window and full layers (``layer_types``), each
kind with its own mask.
"""

from __future__ import annotations

from .base import QWEN_STYLE
from .deepseek import LayerTypesFamily

EXAONE_MOE = LayerTypesFamily(
    model_types=("exaone_moe",),
    **QWEN_STYLE,
    shared_experts="mlp.shared_experts",
    shared_count_key="num_shared_experts",
    # the router's bias, stored beside it: inside it at runtime
    renames=(("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),),
)
