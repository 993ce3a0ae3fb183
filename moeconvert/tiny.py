"""Tiny random MoE checkpoints of every supported family, built with transformers' own classes.

They let anyone try every command in seconds without a download, and are the fixtures of the test
suite. Configs are small but keep each family's quirks: Qwen2-MoE's gated shared expert and a dense
``mlp_only_layers`` layer, DeepSeek's dense first layers, shared experts and V3 group routing,
GLM-4.5's biased q/k/v with normed q and k, GLM-4.7-Flash's MLA with layer kinds listed,
MiniMax-M2's routing bias, ERNIE-4.5's dense first layer and float32 router, DeepSeek-V3.2's sparse
attention (its indexer's top-k below the window length) and GLM-5's layers that reuse the picks of the
one before, K-EXAONE's, Trinity's and Command A+'s mix of sliding-window and full attention, Trinity's
router nested in its MoE block and norms around attention and MLP both, Command A+'s attention beside
its MLP on one normed input, tied head and scaled logits, Hunyuan's router inside its gate module and
top-k listed per layer, MiniCPM5's gated attention (stored as q_proj, run as q_gate_proj),
MiMo-V2-Flash's attention sinks and narrow value heads, LFM2-MoE's feed_forward block and short
convolutions, Granite 4.0-H's Mamba-2 layers, attention without rotary embeddings and experts stacked
under names of their own, Jamba's Mamba layers and experts in every other layer, Hy3's renamed router, bias and shared experts, Laguna's router bias stored among its
experts, Beam's depth-weighed residual stream and capped logits, FlexOlmo's norms after its blocks,
the vision encoders beside GLM-4.5V's, Qwen3.5's (hybrid-attention) and Qwen3-VL-MoE's text models, Granite 3.x's stacked
experts and tied head, Gemma 4's experts beside a dense MLP on the decoder layer itself (with its vision
encoder), Nemotron-H's one mixer per layer, experts without a gate and ``backbone.`` names, Llama 4's
experts fed tokens scaled by their scores, its ``language_model.model.`` names and vision encoder, and
Qwen3-VL-MoE's and Llama 4's transposed expert stacks, as their releases store them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .families import STACKS, family_for

_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# DeepSeek's MoE block (GLM's too) and its multi-head latent attention (MLA), at tiny widths
_DEEPSEEK_MOE: dict[str, Any] = dict(
    intermediate_size=128,
    moe_intermediate_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
)
_MLA: dict[str, Any] = dict(
    num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16
)

# Qwen3-Next's text model (Qwen3.5's too): a gated shared expert, gated linear attention in two of
# three layers
_HYBRID_QWEN: dict[str, Any] = dict(
    moe_intermediate_size=64,
    shared_expert_intermediate_size=96,
    num_experts=8,
    num_experts_per_tok=2,
    head_dim=16,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
)

# Granite 3.x's MoE at tiny widths, with its scaling factors gentler than the releases' (a briefly
# trained model would stay flat under their logit divisor)
_GRANITE_3: dict[str, Any] = dict(
    intermediate_size=96,
    num_local_experts=8,
    num_experts_per_tok=2,
    embedding_multiplier=2.0,
    logits_scaling=2.0,
    residual_multiplier=0.5,
    attention_multiplier=0.25,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "minimax_m2": dict(
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "phimoe": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16
    ),
    "qwen3_next": dict(intermediate_size=128, **_HYBRID_QWEN),
    "olmoe": dict(
        intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "deepseek_v2": dict(
        **_DEEPSEEK_MOE, **_MLA, first_k_dense_replace=1, q_lora_rank=None, n_group=1, topk_group=1
    ),
    "deepseek_v3": dict(
        **_DEEPSEEK_MOE, **_MLA, first_k_dense_replace=1, q_lora_rank=64, n_group=4, topk_group=2
    ),
    # Sarvam-105B: V3's model with one dense layer first, ungrouped routing and no q compression
    "sarvam_mla": dict(
        **_DEEPSEEK_MOE, **_MLA, first_k_dense_replace=1, q_lora_rank=None, n_group=1, topk_group=1
    ),
    # DeepSeek Sparse Attention: each query attends to the indexer's top 48 tokens, fewer than a
    # calibration window holds, so the indexer's choice shapes the outputs. (With 16, which tokens make
    # the cut flips under 8-bit noise often enough to dominate every mean KL.)
    "deepseek_v32": dict(
        **_DEEPSEEK_MOE,
        **_MLA,
        first_k_dense_replace=1,
        q_lora_rank=64,
        n_group=4,
        topk_group=2,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=48,
    ),
    # GLM-5: V3.2's sparse attention, layer 2 attending to the tokens layer 1's indexer picked
    "glm_moe_dsa": dict(
        **_DEEPSEEK_MOE,
        **_MLA,
        first_k_dense_replace=1,
        q_lora_rank=64,
        index_n_heads=2,
        index_head_dim=32,
        index_topk=48,
        indexer_types=["full", "full", "shared"],
    ),
    "glm4_moe": dict(
        **_DEEPSEEK_MOE,
        first_k_dense_replace=1,
        attention_bias=True,
        use_qk_norm=True,
        routed_scaling_factor=2.5,
        n_group=2,
        topk_group=1,
    ),
    "glm4v_moe": dict(
        **_DEEPSEEK_MOE,
        first_k_dense_replace=1,
        attention_bias=True,
        head_dim=16,
        # half of each head rotates (8 dims, 4 frequencies), split over time, height and width
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1]
        ),
        routed_scaling_factor=2.5,
        n_group=1,
        topk_group=1,
    ),
    "glm4_moe_lite": dict(
        **_DEEPSEEK_MOE,
        **_MLA,
        q_lora_rank=64,
        routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    # A.X-K1: V3's model with an RMSNorm on the MoE block's output (stored beside the layer's norms)
    "axk1": dict(
        **_DEEPSEEK_MOE,
        **_MLA,
        q_lora_rank=64,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Kolibri-1: sliding-window attention (16 tokens) in layers 0 and 1, full attention in layer 2
    "kolibri1": dict(
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Flint: a dense layer 0, attention sinks everywhere, a sliding window (16 tokens, with rotary
    # embeddings) in layer 1 and full attention without them in layers 0 and 2
    "flint": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        mlp_only_layers=[0],
        bos_token_id=1,
        eos_token_id=2,
    ),
    # gated attention: the checkpoint's q_proj holds each head's query and output gate
    "minicpm5_moe": dict(**_DEEPSEEK_MOE, first_k_dense_replace=1, head_dim=16, n_group=1, topk_group=1),
    # sliding-window attention (16 tokens) with sinks in layer 1, full attention in layers 0 and 2
    "mimo_v2_flash": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        head_dim=24,  # a third of it rotates, as in the releases: 8 dims
        v_head_dim=8,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    ),
    "solar_open": dict(**_DEEPSEEK_MOE, head_dim=16, n_group=2, topk_group=1),
    "dots1": dict(**_DEEPSEEK_MOE, first_k_dense_replace=1, head_dim=16),
    # sliding-window attention (a window of 16) in layers 0 and 2, full attention in layer 1
    "exaone_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        first_k_dense_replace=1,
        head_dim=16,
        sliding_window=16,
        sliding_window_pattern=2,
        n_group=2,
        topk_group=1,
    ),
    # a dense first layer, then sliding-window (16 tokens) and full attention by turns
    "afmoe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        num_dense_layers=1,
        head_dim=16,
        sliding_window=16,
        global_attn_every_n_layers=2,
    ),
    # a dense first layer, then sliding-window (16 tokens) and full attention by turns; attention and MLP
    # side by side on one LayerNorm'd input, a sigmoid router, the shared expert's output averaged with
    # the routed ones'
    "cohere2_moe": dict(
        intermediate_size=64,
        prefix_dense_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        first_k_dense_replace=1,
        head_dim=16,
        sliding_window=16,
        sliding_window_pattern=2,
        logit_scale=0.5,  # its default, 1/16, keeps a briefly trained tiny model's outputs nearly flat
        expert_selection_fn="sigmoid",
        tie_word_embeddings=True,  # as its releases: serving engines read the head from the embeddings
    ),
    # a shared MLP beside the experts in every layer; the top-k listed per layer, as its releases do
    "hunyuan_v1_moe": dict(intermediate_size=64, num_experts=8, moe_topk=[2, 2, 2], head_dim=16),
    # a dense first layer, then experts; convolution in layers 0 and 2, attention in layer 1
    "lfm2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_dense_layers=1,
        layer_types=["conv", "full_attention", "conv"],
        tie_word_embeddings=True,  # as its releases
    ),
    # Hy3: a dense first layer, then a router nested in the MoE block beside its bias and shared experts
    "hy_v3": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        head_dim=16,
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    # sliding-window attention (16 tokens) in layers 0 and 2, full attention in layer 1
    "mellum": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
    ),
    # a dense first layer; sliding-window attention (16 tokens) in layers 0 and 1, full attention in
    # layer 2; group-limited routing; logits capped at 30 as in its releases
    "beam": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
        n_group=2,
        topk_group=1,
    ),
    # a dense first layer, a shared expert, sliding-window (16 tokens) attention in layer 1, and a
    # router whose logits are soft-capped
    "laguna": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"],
        moe_router_logit_softcapping=30.0,
    ),
    # norms after attention and MLP (OLMo 2's), not before
    "flex_olmo": dict(
        intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # Granite 3.x: experts stacked as released, a tied head (as the releases'), scaled embeddings,
    # residual updates and logits at gentler factors than the releases'; the shared variant's dense MLP
    "granitemoe": dict(_GRANITE_3, tie_word_embeddings=True),
    "granitemoeshared": dict(_GRANITE_3, shared_intermediate_size=64),
    # Granite SWA: Granite 3.x's MoE with sliding-window attention in two of three layers, attention sinks,
    # a base of its own per layer (0: no rotary embedding), no shared MLP (as released); its releases
    # store experts in the runtime layout, as transformers saves them
    "granitemoe_swa": dict(
        _GRANITE_3,
        shared_intermediate_size=0,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        layer_rope_theta=[0.0, 10000.0, 1000000.0],
    ),
    # Granite 4.0-H: Mamba-2 in two of three layers, attention without rotary embeddings, a shared MLP,
    # experts stacked as released; its scaled embeddings, residual updates and logits at gentler factors
    # than the releases' (a briefly trained model would stay flat under their logit divisor)
    "granitemoehybrid": dict(
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        shared_intermediate_size=64,
        layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4,
        mamba_d_state=16,
        mamba_chunk_size=16,
        embedding_multiplier=2.0,
        logits_scaling=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
    ),
    # Jamba: Mamba in three of four layers, attention without rotary embeddings in the rest, experts
    # in every other layer (a dense MLP between)
    "jamba": dict(
        num_hidden_layers=4,
        intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        attn_layer_period=4,
        attn_layer_offset=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=8,
    ),
    # Nemotron-H (Nemotron 3 Nano's kind): one mixer per layer, Mamba-2, MoE, attention without rotary
    # embeddings, MoE again; experts without a gate (relu²), a shared expert, a biased sigmoid router
    "nemotron_h": dict(
        layers_block_type=["mamba", "moe", "attention", "moe"],
        head_dim=16,
        intermediate_size=96,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        moe_shared_expert_intermediate_size=96,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        chunk_size=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "ernie4_5_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    ),
    "qwen3_5_moe": _HYBRID_QWEN,
    # Gemma 4 (26B-A4B's kind): a dense MLP beside the experts in every layer, sliding windows in two of
    # three layers, full-attention layers with wider heads, fewer of them for keys, keys that serve as
    # values and rotary embeddings on a quarter of each head; scaled embeddings, a tied head and capped
    # logits; no per-layer embeddings, no layers that share keys
    "gemma4": dict(
        intermediate_size=96,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        rope_parameters={
            "full_attention": dict(rope_type="proportional", partial_rotary_factor=0.25, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4),
        },
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=64,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=256,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        attention_k_eq_v=True,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    # experts 96 wide against a hidden size of 64: no stack is square, so shapes tell orientations apart
    "qwen3_vl_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2], mrope_interleaved=True
        ),
    ),
    # Llama 4: Maverick's experts in every other layer (dense MLPs between) and Scout's normed q and k;
    # top-1 routing that scales each token into its expert, a shared expert, chunked attention in three
    # of four layers and no rotary embedding in the fourth. Experts 96 wide against a hidden size of 64:
    # no stack is square
    "llama4": dict(
        num_hidden_layers=4,
        head_dim=16,
        intermediate_size=96,
        intermediate_size_mlp=128,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=32,
        use_qk_norm=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}

# Families whose checkpoint is a vision-language model: the text model above, under
# ``model.language_model.``, beside a vision encoder of these widths under ``model.visual.``.
_VISION: dict[str, Any] = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "glm4v_moe": _VISION,
    "qwen3_5_moe": dict(**_VISION, num_position_embeddings=64),
    "qwen3_vl_moe": dict(**_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0]),
    # Gemma 4's encoder (``model.vision_tower.``) and its projection into the text model
    # (``model.embed_vision.``); no audio encoder, as the MoE releases have none
    "gemma4": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        position_embedding_size=64,
    ),
    # Llama 4's encoder (``vision_model.``) and its projection into the text model (``multi_modal_projector.``)
    "llama4": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
        pixel_shuffle_ratio=0.5,
    ),
}
# Families whose vision encoder projects into the text model under a key of its own (Qwen's and GLM's)
_OUT_HIDDEN_SIZE = ("glm4v_moe", "qwen3_5_moe", "qwen3_vl_moe")


def tiny_config(family: str, **overrides: Any) -> Any:
    """A transformers config object for a tiny model of ``family``."""
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; choose from {', '.join(sorted(TINY_CONFIGS))}")
    text = {**_BASE, **TINY_CONFIGS[family], **overrides}
    if family in VISION_CONFIGS:
        vision = dict(VISION_CONFIGS[family])
        if family in _OUT_HIDDEN_SIZE:
            vision["out_hidden_size"] = text["hidden_size"]  # into the text model
        tied = text.get("tie_word_embeddings", False)
        return AutoConfig.for_model(family, text_config=text, vision_config=vision, tie_word_embeddings=tied)
    return AutoConfig.for_model(family, **text)


def auto_class(family: str) -> Any:
    """transformers' auto class of ``family``'s whole model (a vision-language one where it is one):
    the class whose ``save_pretrained`` writes the family's own checkpoint names."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if family in VISION_CONFIGS else AutoModelForCausalLM


def build_tiny_model(
    family: str,
    output: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
    train_steps: int = 0,
    **overrides: Any,
) -> Path:
    """Write a tiny ``family`` model in its original (per-expert) layout.

    Random models have nearly flat output distributions, which hide quantization damage; with
    ``train_steps`` the model first learns the shipped calibration corpus (byte tokens) briefly, so
    its predictions are peaked and a broken expert or a coarse grid shows in the logits.
    """
    config = tiny_config(family, **overrides)
    kind = family_for({"model_type": family})
    text = config.get_text_config()
    if kind.transposed_stacks and text.hidden_size in (kind.expert_size(text), 2 * kind.expert_size(text)):
        raise ValueError("square expert stacks: their orientation could not be told from their shapes")
    transposed = kind.transposed_stacks and not kind.runtime_transposed  # else transformers saves them so
    torch.manual_seed(seed)
    model = auto_class(family).from_config(config)
    _spread_router_weights(model, seed, _ROUTER_SPREAD.get(family, 1.0))
    if train_steps:
        _train(model, train_steps, seed)
    with warnings.catch_warnings():  # Llama 4's complex rotary table: not saved, rebuilt on load
        warnings.filterwarnings("ignore", "Casting complex values to real")
        model = model.to(dtype)
    output = Path(output)
    model.save_pretrained(output, max_shard_size=max_shard_size)
    if transposed:
        _transpose_stacks(output)
    return output


def _transpose_stacks(folder: Path) -> None:
    """Rewrite the expert stacks that transformers saved in its runtime orientation as the family's
    releases store them, [E, H, 2I] and [E, I, H] (same names and sizes: the index stays valid)."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        for name in [n for n in tensors if n.endswith(STACKS)]:
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})


# Router weights' spread where the model scales tokens by a sigmoid of their logits (Llama 4's): logits
# of unit-variance weights sit in its flat tail, scoring nearly every token 1, which would hide whether
# the scores reach the experts; the argmax, and so the routing, does not depend on the spread
_ROUTER_SPREAD = {"llama4": 0.1}


def _spread_router_weights(model: torch.nn.Module, seed: int, spread: float = 1.0) -> None:
    """Random init leaves routers near zero (flat routing); scale them so experts get distinct loads."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                name.endswith(
                    (
                        "mlp.gate.weight",
                        "mlp.router.weight",
                        "mlp.router.gate.weight",
                        "mlp.gate.wg.weight",
                        "feed_forward.gate.weight",
                        "block_sparse_moe.router.weight",
                        "feed_forward.router.weight",
                        "router.proj.weight",
                        "mixer.gate.weight",
                    )
                )
                and param.dim() == 2
            ):
                param.copy_((torch.randn(param.shape, generator=generator) * spread).to(param.dtype))


def _train(model: torch.nn.Module, steps: int, seed: int, batch: int = 8, seq_len: int = 64) -> None:
    """A few hundred steps of next-byte prediction on the shipped corpus (seconds on a CPU)."""
    from .quant.calibration import load_text, sample_windows

    stream = torch.tensor(list(load_text(None).encode("utf-8")), dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation (and stall on a busy machine)
    model.train()
    try:
        for step in range(steps):
            tokens = sample_windows(stream, batch, seq_len + 1, seed * 100_003 + step)
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:].contiguous()).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()
