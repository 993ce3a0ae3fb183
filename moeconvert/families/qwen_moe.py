"""Qwen1.5/Qwen2-MoE (one gated shared expert), Qwen3-MoE (none), Qwen3-Next (hybrid attention),
Qwen3.5-MoE (Qwen3-Next's text model in a vision-language checkpoint) and Qwen3-VL-MoE (Qwen3-MoE's).

All but Qwen3.5 place sparse blocks by ``decoder_sparse_step`` and exempt ``mlp_only_layers``, which
then hold a dense MLP; every Qwen3.5 layer is sparse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import QWEN_STYLE, Family


@dataclass(frozen=True)
class QwenMoeFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        step = getattr(config, "decoder_sparse_step", 1)  # Qwen3.5 has neither key: all layers sparse
        return (
            layer not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0
            and (layer + 1) % step == 0
        )


QWEN2_MOE = QwenMoeFamily(model_types=("qwen2_moe",), shared_experts="mlp.shared_expert", **QWEN_STYLE)
QWEN3_MOE = QwenMoeFamily(model_types=("qwen3_moe",), **QWEN_STYLE)
# Qwen3-Next: Qwen2-MoE's gated shared expert, and three of four layers with gated linear attention
# (``linear_attn``) in place of ``self_attn``. Its projections feed a recurrent state, where 4-bit
# errors build up over the sequence (mean KL 9x that of keeping them, on the tiny model): they stay in
# full precision, as published quantizations of the model keep them.
QWEN3_NEXT = QwenMoeFamily(
    model_types=("qwen3_next",),
    shared_experts="mlp.shared_expert",
    keep=(r"\.linear_attn\.",),
    **QWEN_STYLE,
)
# Qwen3.5-MoE: Qwen3-Next's MoE block and hybrid attention (with ``in_proj_qkv``/``in_proj_z``/
# ``in_proj_b``/``in_proj_a``, kept as Qwen3-Next's are), as the text model of a vision-language
# checkpoint: ``model.language_model.*`` beside ``model.visual.*``, which every command carries. Its
# releases store experts either per expert or already stacked; both are read.
QWEN3_5_MOE = QwenMoeFamily(
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    shared_experts="mlp.shared_expert",
    keep=(r"\.linear_attn\.",),
    **QWEN_STYLE,
)
# Qwen3-VL-MoE: Qwen3-MoE's text model (interleaved multimodal rotary embedding aside, which text alone
# does not use) in a vision-language checkpoint laid out as Qwen3.5's. Its releases store the experts of
# a layer stacked and transposed; FP8 releases and quantized outputs store them per expert.
QWEN3_VL_MOE = QwenMoeFamily(
    model_types=("qwen3_vl_moe", "qwen3_vl_moe_text"), transposed_stacks=True, **QWEN_STYLE
)
