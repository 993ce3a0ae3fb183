"""``inspect``: what an MoE checkpoint costs, from its config and safetensors headers alone.

Total parameters set the memory floor (every expert must be resident); active parameters set the
compute and the bytes read per token (only the top-k routed experts run). Both are counted over the
real tensor headers, not estimated from the config, so the numbers hold for any variant of a family;
only an already quantized checkpoint, whose headers hold packed words and scales, is counted from
transformers' model for its config. MTP modules (DeepSeek-V3's and GLM's layers after the decoder
layers, Qwen3-Next's top-level ``mtp.*``) count in the total and the memory floor, at full precision
since conversions carry them as they are, but not as active: they predict extra tokens for
speculative decoding and are off the path of every token. So do the encoders of a vision-language
checkpoint (Qwen3.5's ``model.visual.*``), which run on images, not on the text's tokens.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .checkpoint import is_mtp, is_tower, layer_index, layer_prefix
from .families import Family, family_for, load_config
from .fp8 import fp8_source, header_reader, quantization_method, scale_names, source_dtype, without_fp8_config
from .relayout import check_against_config, is_released_stack
from .safetensors_header import TensorMeta
from .source import ModelMetadata, read_metadata

GROUP_SIZE = 128  # group size assumed when estimating quantized sizes (scales: fp16 per group)


@dataclass
class LayerSummary:
    layer: int
    moe: bool
    experts: int
    routed_params: int  # parameters of all routed experts of the layer
    other_params: int


@dataclass
class ModelSummary:
    """Everything ``moeconvert inspect`` reports; ``asdict`` of it is the ``--json`` output."""

    model: str
    family: str
    layout: str  # "original" (per-expert tensors) or "fused" (stacked experts)
    num_layers: int
    moe_layers: list[int]
    dense_layers: list[int]
    mtp_layers: list[int]  # multi-token prediction layers after the decoder layers, carried as they are
    mtp_params: int  # parameters of those layers, or of top-level MTP modules (Qwen3-Next's ``mtp.*``)
    tower_params: int  # parameters of encoders beside the text model (``model.visual.*``), carried
    num_experts: int
    top_k: int
    shared_experts: int
    expert_intermediate_size: int
    hidden_size: int
    dtypes: dict[str, int]  # dtype -> elements stored in it (packed words, for a quantized checkpoint)
    shards: int
    total_params: int
    active_params: int
    routed_expert_params: int
    weight_bytes: dict[str, int]  # memory floor at bf16 / int8 / int4
    active_bytes_per_token: dict[str, int]
    disk_bytes: dict[str, int]  # a conversion needs the download (Hub ids) plus its output
    layers: list[LayerSummary] = field(default_factory=list)
    quantization: str | None = None  # quant_method of an already quantized checkpoint (FP8 blocks aside)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_routed_expert(family: Family, local: str) -> bool:
    return family.to_fused_name(local) in family.fused_stacks or bool(
        family.original_expert_re().match(local)
    )


def _is_quantizable(meta: TensorMeta, num_layers: int) -> bool:
    """Linear weights of decoder layers (experts, attention, dense MLPs), not norms/router/embeddings,
    nor MTP layers (carried in full precision)."""
    name, index = meta.name, layer_index(meta.name)
    if index is None or index >= num_layers or len(meta.shape) < 2:
        return False
    return not re.search(r"\.(gate|router|router\.layer|shared_expert_gate)\.weight$", name)


def _bytes_at(meta: TensorMeta, bits: int | None, num_layers: int, fraction: float = 1.0) -> float:
    """Bytes of a tensor stored at ``bits`` (None: bf16) with a fp16 scale per group of inputs."""
    if bits is None or not _is_quantizable(meta, num_layers):
        return meta.numel * 2 * fraction
    scales = meta.numel / GROUP_SIZE * 2
    return (meta.numel * bits / 8 + scales) * fraction


def _parameters(meta: ModelMetadata, config: Any, quantized: bool) -> dict[str, TensorMeta]:
    """The tensors whose elements are parameters: the headers' own, or for a quantized checkpoint, whose
    packed words and scales are not, those of transformers' text model for its config (tied embeddings
    once) and the headers of what conversions carry as it is (MTP modules, a vision encoder). An FP8
    source's scales are left out: they belong to the weights it is read as."""
    if not quantized:
        scales = _fp8_scales(meta)
        return {name: t for name, t in meta.tensors.items() if name not in scales}
    from .relayout import model_shapes

    shapes = model_shapes(config)
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    carried = {
        name: stored
        for name, stored in meta.tensors.items()
        if is_tower(name) or is_mtp(name, config.num_hidden_layers)
    }
    return {**{name: TensorMeta(name, "BF16", shape, "") for name, shape in shapes.items()}, **carried}


def _fp8_scales(meta: ModelMetadata) -> set[str]:
    """The names of an FP8 source's scales (none for any other checkpoint)."""
    source = fp8_source(meta.config)
    if source is None:
        return set()
    return scale_names({name: t.dtype for name, t in meta.tensors.items()}, source)


def _fused_bytes(meta: ModelMetadata) -> int:
    """Bytes ``fuse`` writes: the checkpoint's own, or for an FP8 source its weights dequantized, in the
    dtype it is read as, without their scales."""
    if fp8_source(meta.config) is None:
        return meta.weight_bytes
    scales, width = _fp8_scales(meta), source_dtype(meta.config).itemsize
    return sum(
        t.numel * width if t.dtype.startswith("F8_") else t.nbytes
        for name, t in meta.tensors.items()
        if name not in scales
    )


def _stores_quantized_stacks(family: Family, meta: ModelMetadata) -> bool:
    """Whether a quantized checkpoint stores its experts stacked (``--format fused``:
    ``mlp.experts.gate_up_proj.weight_packed``), rather than one module per expert: its parameters are
    counted from transformers' model, whose names are stacked either way."""
    for name in meta.tensors:
        if layer_index(name) is not None:
            module = name[len(layer_prefix(name)) :].rpartition(".")[0]
            if module in family.fused_stacks:
                return True
    return False


def summarize(meta: ModelMetadata) -> ModelSummary:
    """Count parameters, bytes and layer kinds of a checkpoint from its metadata."""
    family = family_for(meta.config)
    method = quantization_method(meta.config)
    config = load_config(meta.config)
    tensors = _parameters(meta, config, method is not None)
    num_experts, top_k = family.num_experts(config), family.top_k(config)
    layers: dict[int, LayerSummary] = {
        i: LayerSummary(i, family.is_moe_layer(config, i), 0, 0, 0) for i in range(config.num_hidden_layers)
    }
    dtypes: dict[str, int] = {}
    total = routed = mtp = tower = 0
    mtp_layers: set[int] = set()
    active_fraction: dict[str, float] = {}
    fused = False
    for stored in meta.tensors.values():
        dtypes[stored.dtype] = dtypes.get(stored.dtype, 0) + stored.numel
    for name, tensor in sorted(tensors.items()):
        total += tensor.numel
        index = layer_index(name)
        local = name[len(layer_prefix(name)) :] if index is not None else name
        expert = index is not None and _is_routed_expert(family, local)
        fused = fused or (  # Qwen3-VL-MoE releases stack experts: transposed, they are its original
            method is None
            and local in family.fused_stacks
            and (family.runtime_releases or not is_released_stack(family, config, local, tensor.shape))
        )  # (Llama 4's transposed stacks are transformers' runtime layout too)
        if is_mtp(name, config.num_hidden_layers):
            mtp_layers.update([] if index is None else [index])
            mtp += tensor.numel
            active_fraction[name] = 0.0
            continue
        if is_tower(name):
            tower += tensor.numel
            active_fraction[name] = 0.0
            continue
        active_fraction[name] = top_k / num_experts if expert else 1.0
        if index is not None and index in layers:
            summary = layers[index]
            if expert:
                summary.routed_params += tensor.numel
            else:
                summary.other_params += tensor.numel
        routed += tensor.numel if expert else 0
    for summary in layers.values():
        summary.experts = num_experts if summary.routed_params else 0
    fused = fused or (method is not None and _stores_quantized_stacks(family, meta))
    active = total - mtp - tower - routed + round(routed * top_k / num_experts)
    depth = config.num_hidden_layers
    weight_bytes = {
        label: round(sum(_bytes_at(t, bits, depth) for t in tensors.values()))
        for label, bits in (("bf16", None), ("int8", 8), ("int4", 4))
    }
    active_bytes = {
        label: round(sum(_bytes_at(t, bits, depth, active_fraction[n]) for n, t in tensors.items()))
        for label, bits in (("bf16", None), ("int8", 8), ("int4", 4))
    }
    stored = meta.weight_bytes
    return ModelSummary(
        model=str(meta.ref),
        family=family.name,
        layout="fused" if fused else "original",
        num_layers=config.num_hidden_layers,
        moe_layers=[i for i, s in layers.items() if s.moe],
        dense_layers=[i for i, s in layers.items() if not s.moe],
        mtp_layers=sorted(mtp_layers),
        mtp_params=mtp,
        tower_params=tower,
        num_experts=num_experts,
        top_k=top_k,
        shared_experts=family.num_shared_experts(config),
        expert_intermediate_size=family.expert_size(config),
        hidden_size=config.hidden_size,
        dtypes=dict(sorted(dtypes.items())),
        shards=len(meta.files),
        total_params=total,
        active_params=active,
        routed_expert_params=routed,
        weight_bytes=weight_bytes,
        active_bytes_per_token=active_bytes,
        disk_bytes={
            "download": stored if meta.ref.repo_id else 0,
            "fused_output": _fused_bytes(meta),
            "int8_output": weight_bytes["int8"],
            "int4_output": weight_bytes["int4"],
        },
        layers=list(layers.values()),
        quantization=method,
    )


def inspect_model(model: str, revision: str | None = None, token: str | None = None) -> ModelSummary:
    """Summarise MODEL (Hub id or folder) without downloading weights.

    For a Hub id only ``config.json`` and the safetensors headers are fetched (HTTP range requests);
    for a folder only the header bytes are read.

    Raises:
        MoeConvertError: MODEL missing, not a supported MoE family, with corrupt headers, or with tensors
            that contradict its config.json (other expert counts or shapes).
    """
    metadata = read_metadata(model, revision, token)
    summary = summarize(metadata)
    if summary.quantization is None:  # packed integer tensors have shapes of their own
        plain = without_fp8_config(metadata.config)  # FP8 sources are checked as read: dequantized
        reader = header_reader(metadata.tensors, metadata.config)
        check_against_config(reader, family_for(plain), load_config(plain))
    return summary
