"""A.X-K1 (``axk1``, SK Telecom): DeepSeek-V3's model with one addition, an RMSNorm on the MoE block's
output.

Its releases store that norm beside the layer's other norms (``post_mlp_layernorm``), and transformers
runs it inside the MoE block (``mlp.post_mlp_layernorm``): ``fuse`` renames it, ``unfuse`` and every
quantized output keep the release's name. Dense MLPs are named by ``mlp_layer_types`` (the config
derives it from ``first_k_dense_replace``); attention is always MLA with a compressed query.
"""

from __future__ import annotations

from .deepseek import DEEPSEEK_COMMON, LayerTypesFamily

AXK1 = LayerTypesFamily(
    model_types=("axk1",),
    renames=(("post_mlp_layernorm.", "mlp.post_mlp_layernorm."),),
    **DEEPSEEK_COMMON,
)
