"""IBM Granite's MoE models. All of them scale their embeddings, residual updates and logits.

- Granite 3.x (``granitemoe``): attention with rotary embeddings and routed experts in every layer;
  ``granitemoeshared`` adds a dense shared MLP (``shared_mlp``) beside the experts.
- Granite SWA (``granitemoe_swa``): ``granitemoeshared`` with sliding-window attention, attention sinks and
  a rotary base per layer, released in transformers' runtime layout itself (see ``GRANITEMOE_SWA``).
- Granite 4.0-H (``granitemoehybrid``): most layers mix tokens with Mamba-2 (``mamba``), the rest with
  attention (``self_attn``, without rotary embeddings in the H releases), as ``layer_types`` says; every
  layer adds a shared MLP to its routed experts.

Their releases store each layer's experts already stacked, in the runtime orientation but under names
of their own: ``block_sparse_moe.input_linear.weight`` [E, 2I, H] (gate rows first) and
``block_sparse_moe.output_linear.weight`` [E, H, I], with the router at
``block_sparse_moe.router.layer.weight``. ``fuse`` renames them to transformers' runtime names and
``unfuse`` back. Quantized outputs store experts one per expert, under the names vLLM's loader for
each model type reads them under: Granite 4.0-H's ``block_sparse_moe.experts.{e}.gate_proj/up_proj/
down_proj``, Granite 3.x's Mixtral-style ``w1/w3/w2`` (gate, up, down); vLLM renames the released
router itself. transformers reads Granite's experts only stacked.

The Mamba mixers' projections stay in full precision: they feed a recurrent state, in which 4-bit
errors build up along the sequence, as Qwen3-Next's linear attention keeps them (quantized with the
rest, they raise the tiny model's mean 4-bit KL 17-18x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class GraniteFamily(Family):
    def is_moe_layer(self, config: Any, layer: int) -> bool:
        return int(config.num_local_experts or 0) > 0

    def num_shared_experts(self, config: Any) -> int:
        """One dense shared MLP, absent where ``shared_intermediate_size`` is 0 (its default in some
        configs)."""
        return int(self.shared_experts is not None and bool(getattr(config, "shared_intermediate_size", 0)))


GRANITEMOEHYBRID = GraniteFamily(
    model_types=("granitemoehybrid",),
    moe_block="block_sparse_moe",
    projections=("gate_proj", "up_proj", "down_proj"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    renames=(
        ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
        ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
        ("block_sparse_moe.router.layer.", "block_sparse_moe.router."),
    ),
    router="block_sparse_moe.router",
    shared_experts="shared_mlp",
    keep=(r"\.mamba\.",),
    released_stacks=True,
    block="block_sparse_moe",
)


# Granite 3.x: attention with rotary embeddings in every layer, experts in every layer; the shared variant
# adds ``shared_mlp`` (absent where ``shared_intermediate_size`` is 0)
_GRANITE_3 = dict(
    moe_block="block_sparse_moe",
    projections=("w1", "w3", "w2"),
    num_experts_key="num_local_experts",
    top_k_key="num_experts_per_tok",
    expert_size_key="intermediate_size",
    renames=GRANITEMOEHYBRID.renames,
    router="block_sparse_moe.router",
    released_stacks=True,
    block="block_sparse_moe",
)
GRANITEMOE = GraniteFamily(model_types=("granitemoe",), **_GRANITE_3)
GRANITEMOESHARED = GraniteFamily(model_types=("granitemoeshared",), shared_experts="shared_mlp", **_GRANITE_3)
# Granite SWA (granite-swash): Granite 3.x's shared variant with sliding-window attention and attention
# sinks, released in transformers' runtime layout (``block_sparse_moe.experts.gate_up_proj``, router
# ``block_sparse_moe.router.weight``), which vLLM splits into Granite 3.x's per-expert names itself
GRANITEMOE_SWA = GraniteFamily(
    model_types=("granitemoe_swa",),
    shared_experts="shared_mlp",
    runtime_releases=True,
    **{k: v for k, v in _GRANITE_3.items() if k not in ("renames", "released_stacks")},
)
