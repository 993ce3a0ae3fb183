"""Flint (``flint``): Qwen2-MoE's layout (dense MLPs in ``mlp_only_layers``, one shared expert under
``mlp.shared_expert``, here without a gate) with a float32 sigmoid router, and attention whose heads add
a learned sink to the softmax, with rotary embeddings in its sliding-window layers only.

Its releases store the sinks as ``self_attn.softmax_offset``, which transformers renames to
``self_attn.sinks``: ``fuse`` renames them the same way, ``unfuse`` and every quantized output keep the
release's name.
"""

from __future__ import annotations

from .base import QWEN_STYLE
from .qwen_moe import QwenMoeFamily

FLINT = QwenMoeFamily(
    model_types=("flint",),
    shared_experts="mlp.shared_expert",
    renames=(("self_attn.softmax_offset", "self_attn.sinks"),),
    **QWEN_STYLE,
)
