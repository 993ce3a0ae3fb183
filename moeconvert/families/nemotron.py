"""NVIDIA's Nemotron-H MoE models (``nemotron_h``): Nemotron 3 Nano (30B-A3B), Super and Ultra.

Each decoder layer is one mixer after one norm: Mamba-2 (``mixer.in_proj``/``out_proj``...), attention
without rotary embeddings (``mixer.q_proj``...), a dense MLP, or an MoE block, as ``layers_block_type``
(or the releases' ``hybrid_override_pattern``) says. The MoE block (``mixer``) routes with a float32
sigmoid router with a bias (``mixer.gate.weight``, ``mixer.gate.e_score_correction_bias``) to experts
without a gate projection, ``down(relu²(up(x)))``: ``mixer.experts.{e}.up_proj/down_proj``, stacked by
transformers as ``mixer.experts.up_proj`` [E, I, H] and ``down_proj`` [E, H, I]; one shared expert
(``mixer.shared_experts.up_proj/down_proj``) runs beside them. Super and Ultra project the hidden states
to a narrower width before the experts and back after (``moe_latent_size``; ``mixer.fc1_latent_proj``,
``fc2_latent_proj``), which the experts then read and write.

The releases call the text model ``backbone.`` (``backbone.embeddings``, ``backbone.norm_f``), which
transformers and vLLM rename to ``model.`` as they load it; every output keeps the release's names. The
Mamba mixers' projections stay in full precision, as Granite 4.0-H's and Jamba's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class NemotronHFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return config.layers_block_type[layer] == "moe"

    def expert_input_size(self, config: Any) -> int:
        return int(getattr(config, "moe_latent_size", None) or config.hidden_size)


NEMOTRON_H = NemotronHFamily(
    model_types=("nemotron_h",),
    moe_block="mixer",
    projections=("up_proj", "down_proj"),
    num_experts_key="n_routed_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
    router="mixer.gate",
    shared_experts="mixer.shared_experts",
    keep=(r"\.mixer\.(?:in_proj|out_proj)$",),  # Mamba-2's; attention's are q/k/v/o_proj
    block="mixer",
    reads_routed_output=("mixer.fc2_latent_proj.",),
)
