"""poolside's Laguna (``laguna``): a sigmoid router (its logits optionally soft-capped) whose bias is
stored among the experts (``mlp.experts.e_score_correction_bias``; transformers'
``mlp.gate.e_score_correction_bias``), one shared expert (``mlp.shared_expert``; ``mlp.shared_experts``),
dense layers named by ``mlp_layer_types``, gated attention with a head count per layer, and
sliding-window and full attention.
"""

from __future__ import annotations

from .base import QWEN_STYLE
from .deepseek import LayerTypesFamily

LAGUNA = LayerTypesFamily(
    model_types=("laguna",),
    shared_experts="mlp.shared_experts",
    renames=(
        ("mlp.experts.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
        ("mlp.shared_expert.", "mlp.shared_experts."),
    ),
    **QWEN_STYLE,
)
