"""JetBrains' Mellum2 (``mellum``): Qwen3-MoE's block (a softmax router, routed experts only) with dense
layers named by ``mlp_layer_types``, sliding-window and full attention (``layer_types``), and an MTP
block beside the model (``mtp.*``), carried as it is.
"""

from __future__ import annotations

from .base import QWEN_STYLE
from .deepseek import LayerTypesFamily

MELLUM = LayerTypesFamily(
    model_types=("mellum",),
    **QWEN_STYLE,
)
