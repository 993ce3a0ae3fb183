"""Ai2's FlexOlmo (``flex_olmo``): OLMoE's MoE block (a softmax router, routed experts as wide as
``intermediate_size``) in every layer, with OLMo 2's norms after attention and after the MLP instead of
before them, so its layers run whole rather than finishing from a residual stream.
"""

from __future__ import annotations

from .base import QWEN_STYLE, Family

FLEX_OLMO = Family(model_types=("flex_olmo",), **{**QWEN_STYLE, "expert_size_key": "intermediate_size"})
