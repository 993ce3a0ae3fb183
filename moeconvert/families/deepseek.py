"""DeepSeek-V2, V3 and V3.2: dense MLPs before ``first_k_dense_replace``, then routed + shared experts.

V3 adds the router's ``e_score_correction_bias`` (stored as ``mlp.gate.e_score_correction_bias``) and
group-limited routing; both are router state, kept as they are. dots.llm1 (``dots1``) is V3's MoE block
with plain q/k/v attention (q and k normed), Solar Open (``solar_open``) with plain attention and no dense
layer; Sarvam-105B (``sarvam_mla``) is V3 under a config of its own, which transformers runs as V3 and
reads in the releases' format too (``num_experts``, ``num_shared_experts``, ``rope_scaling`` of type
``deepseek_yarn``). V3.2 is V3 with DeepSeek Sparse Attention: each layer's
``self_attn.indexer`` scores past tokens and attention reads only the top ``index_topk`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class DeepseekFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return layer >= config.first_k_dense_replace

    def routing_problem(self, config: Any) -> str | None:
        """Group-limited routing also picks ``topk_group`` of ``n_group`` equal groups of experts first."""
        problem = super().routing_problem(config)
        groups, picked = getattr(config, "n_group", None), getattr(config, "topk_group", None)
        if problem or not groups or picked is None:
            return problem
        experts, top_k = self.num_experts(config), self.top_k(config)
        if experts % groups or not 1 <= picked <= groups or top_k > picked * (experts // groups):
            return (
                f"n_group={groups}, topk_group={picked} with {experts} experts and top-{top_k} (group-limited "
                "routing needs equal groups, 1 <= topk_group <= n_group and top-k within the picked groups)"
            )
        return None


@dataclass(frozen=True)
class LayerTypesFamily(DeepseekFamily):
    """DeepSeek's MoE block with each decoder layer's MLP named in ``mlp_layer_types`` ("dense" or
    "sparse"), which is what transformers' model reads (the config derives it from
    ``first_k_dense_replace`` when it is not given)."""

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return config.mlp_layer_types[layer] == "sparse"

    def routing_problem(self, config: Any) -> str | None:
        """Any other list would fail in transformers' model, or build MLPs where the checkpoint holds experts."""
        kinds, depth = config.mlp_layer_types, config.num_hidden_layers
        if not isinstance(kinds, list) or len(kinds) != depth or not set(kinds) <= {"dense", "sparse"}:
            return (
                f"mlp_layer_types={kinds!r} (needs one of 'dense' or 'sparse' for each of the {depth} layers)"
            )
        return super().routing_problem(config)


@dataclass(frozen=True)
class AllSparseFamily(DeepseekFamily):
    """DeepSeek's MoE block in every decoder layer (Solar Open's config has no ``first_k_dense_replace``)."""

    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return True


DEEPSEEK_COMMON = dict(  # names and keys, shared with GLM (glm.py)
    moe_block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="n_routed_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="moe_intermediate_size",
    shared_experts="mlp.shared_experts",
    shared_count_key="n_shared_experts",
)

DEEPSEEK_V2 = DeepseekFamily(model_types=("deepseek_v2",), **DEEPSEEK_COMMON)
DEEPSEEK_V3 = DeepseekFamily(model_types=("deepseek_v3",), **DEEPSEEK_COMMON)
DOTS1 = DeepseekFamily(model_types=("dots1",), **DEEPSEEK_COMMON)
SARVAM_MLA = DeepseekFamily(model_types=("sarvam_mla",), **DEEPSEEK_COMMON)
SOLAR_OPEN = AllSparseFamily(model_types=("solar_open",), **DEEPSEEK_COMMON)
# The indexer stays in full precision: its top-k decides which tokens attention reads at all, and it is a
# fraction of a percent of the model (serving engines build its weights_proj unquantized in any case).
DEEPSEEK_V32 = LayerTypesFamily(model_types=("deepseek_v32",), keep=(r"\.indexer\.",), **DEEPSEEK_COMMON)
