"""GLM-4.5/4.6/4.7 (``glm4_moe``), GLM-4.5V/4.6V (``glm4v_moe``), GLM-4.7-Flash (``glm4_moe_lite``) and
GLM-5 (``glm_moe_dsa``): DeepSeek-V3's MoE block.

Both keep V3's names and config keys (routed experts under ``mlp.experts``, ``mlp.shared_experts``, a
sigmoid router with ``e_score_correction_bias`` and group-limited routing) and ship an MTP layer after
the last decoder layer. ``glm4_moe`` has standard q/k/v attention (biased) and places its dense layers by
``first_k_dense_replace``; ``glm4_moe_lite`` has V3's MLA attention and places them by
``mlp_layer_types`` (one dense layer first unless the config says otherwise), which is what
transformers' model reads. ``glm_moe_dsa`` adds DeepSeek-V3.2's sparse attention, with a twist: only
the layers ``indexer_types`` calls "full" run an indexer (``self_attn.indexer``); a "shared" layer
attends to the tokens the layer before it picked (see :mod:`moeconvert.forward`).
"""

from __future__ import annotations

from .deepseek import DEEPSEEK_COMMON, DeepseekFamily, LayerTypesFamily

GLM4_MOE = DeepseekFamily(model_types=("glm4_moe",), **DEEPSEEK_COMMON)
# GLM-4.5V/4.6V: GLM-4.5's text model in a vision-language checkpoint (``model.language_model.*`` beside
# ``model.visual.*``, which every command carries)
GLM4V_MOE = DeepseekFamily(model_types=("glm4v_moe", "glm4v_moe_text"), **DEEPSEEK_COMMON)
GLM4_MOE_LITE = LayerTypesFamily(model_types=("glm4_moe_lite",), **DEEPSEEK_COMMON)
# the indexers stay in full precision, as DeepSeek-V3.2's (deepseek.py): their picks decide which tokens
# attention reads, in their own layer and in the shared layers after it
GLM_MOE_DSA = LayerTypesFamily(model_types=("glm_moe_dsa",), keep=(r"\.indexer\.",), **DEEPSEEK_COMMON)
