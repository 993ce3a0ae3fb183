"""Aleph Alpha's Kolibri-1 (``kolibri1``): Qwen3-MoE's experts in every layer, one shared expert
(``mlp.shared_experts``, ``shared_expert_intermediate_size`` wide), a float32 sigmoid router with a
bias that picks the experts, norms after attention and after the MLP as GLM-4 places them, and
sliding-window attention in four of five layers.

Its releases store the router's bias and the two extra norms under names of their own
(``moe.router.expert_bias``, ``post_attn_norm``, ``post_ffn_norm``), which transformers renames; ``fuse``
renames them the same way, ``unfuse`` and every quantized output keep the release's names.
Kolibri-1.1 (``kolibri1_1``) is not the same model: its attention layers read keys and values that
other layers computed, which a pass over one layer at a time does not hold.
"""

from __future__ import annotations

from .base import QWEN_STYLE, Family

KOLIBRI1 = Family(
    model_types=("kolibri1",),
    shared_experts="mlp.shared_experts",
    renames=(
        ("moe.router.expert_bias", "mlp.gate.e_score_correction_bias"),
        ("post_attn_norm.", "post_self_attn_layernorm."),
        ("post_ffn_norm.", "post_mlp_layernorm."),
    ),
    **QWEN_STYLE,
)
