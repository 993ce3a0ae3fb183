"""``fuse`` and ``unfuse``: lossless re-layout between per-expert and stacked expert tensors.

Both run the same streaming driver: plan every output tensor from headers alone (the layer function
applied to shape-only "meta" tensors), then read one layer, convert it, append it to the open shard,
and drop it. Peak memory is one layer whatever the depth of the model.

Both are pure byte moves, so the driver copies nothing itself: tensors are read as views of the source
files (``ShardedReader.views``), fuse's stacks are written from the experts they stack
(:func:`concat_experts`), unfuse's per-expert tensors are views of the stacks, and the next layer is
prefetched from disk while this one is written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import (
    LAYER_RE,
    Concatenated,
    ShardedReader,
    ShardedWriter,
    iter_groups,
    parse_size,
    plan_group,
    text_model_name,
)
from .errors import CorruptCheckpointError, OutputWriteError, UnsupportedModelError
from .families import Family, family_for, in_block, is_stack_name, load_config
from .fp8 import full_precision_config, open_reader
from .layout import stack_experts, unstack_experts
from .manifest import write_manifest
from .output_folder import OutputFolder
from .source import first_line, read_config, resolve_model, side_files

LayerFn = Callable[[int | None, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _split_layer_prefix(name: str) -> tuple[str, str]:
    match = LAYER_RE.match(name)
    return (match.group(0), name[match.end() :]) if match else ("", name)


def fuse_layer(
    family: Family,
    config: Any,
    layer: int | None,
    tensors: dict[str, torch.Tensor],
    stack: Callable[..., tuple[Any, Any]] = stack_experts,
) -> dict[str, torch.Tensor]:
    """One layer in the original layout -> the transformers 5 runtime layout (stacked experts).

    ``stack`` builds (gate_up, down) from the experts' gate, up and down lists; :func:`fuse` passes
    :func:`concat_experts`, whose stacks are never built but written from the experts. MTP layers after
    the decoder layers (DeepSeek-V3, GLM-4.5; :func:`check_layer_count` admits them) are carried as
    they are: transformers' model has no module for them, and engines that run them read them by
    their original names."""
    if layer is not None and layer >= config.num_hidden_layers:
        return dict(tensors)
    if _has_transposed_stacks(family, config, tensors):  # stacked as released: turned, strays refused
        if family.runtime_releases:  # transformers' own layout (Llama 4's): nothing to fuse
            raise UnsupportedModelError(_already_runtime(family))
        return runtime_layer(family, config, layer, tensors)
    expert_re = family.original_expert_re()
    experts: dict[tuple[int, str], torch.Tensor] = {}
    released: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    prefix = ""
    for name, tensor in tensors.items():
        prefix, local = _split_layer_prefix(name)
        if local in family.fused_stacks:
            if family.transposed_stacks:  # in neither orientation: config.json says otherwise
                why = (
                    f"{family.expert_size_key}={family.expert_size(config)}, hidden_size={config.hidden_size}"
                )
                _check_shape(name, tensor, _stack_shapes(family, config)[local], why)
            if family.runtime_releases:  # nothing to fuse: the family's releases are stored so
                raise UnsupportedModelError(f"{name}: {_already_runtime(family)}")
            raise UnsupportedModelError(f"{name}: checkpoint is already fused (use unfuse to go back)")
        match = expert_re.match(local)
        if match:
            experts[(int(match.group(1)), match.group(2))] = tensor
        elif family.released_stacks and family.to_fused_name(local) in family.fused_stacks:
            released[family.to_fused_name(local)] = tensor  # stacked as released (Granite's): renamed
        elif family.to_fused_name(local).startswith(
            in_block(family.moe_block, "experts.")
        ):  # not renamed away
            raise UnsupportedModelError(
                f"{name}: unsupported expert tensor (pre-quantized or FP8 checkpoint?)"
            )
        else:
            out[prefix + family.to_fused_name(local)] = tensor
    if layer is None:
        if experts or released:
            raise CorruptCheckpointError("expert tensors found outside the decoder layers (top level)")
        return out
    if released:
        return _released_stacks(family, config, layer, prefix, experts, released, out, tensors)
    _check_experts(family, config, prefix, layer, experts)
    _check_router(family, config, layer, tensors)
    if experts:
        count = family.num_experts(config)
        per_projection = [[experts[(e, name)] for e in range(count)] for name in family.projections]
        out[prefix + family.fused_gate_up], out[prefix + family.fused_down] = stack(*per_projection)
    return out


def _already_runtime(family: Family) -> str:
    return (
        f"checkpoint is already fused ({family.name} releases are in the runtime layout; "
        "quantize and verify read it as it is, unfuse writes it per expert)"
    )


def _released_stacks(
    family: Family,
    config: Any,
    layer: int,
    prefix: str,
    experts: dict[tuple[int, str], torch.Tensor],
    released: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A layer whose experts are stacked as the family's releases store them (in the runtime orientation,
    under names of their own): renamed; both stacks, in a layer config.json makes sparse, and nothing
    per expert beside them."""
    if experts:
        raise CorruptCheckpointError(f"layer {layer}: per-expert tensors beside the layer's stacked experts")
    if not family.is_moe_layer(config, layer):
        raise CorruptCheckpointError(f"layer {layer} holds experts but config.json makes it a dense layer")
    missing = [family.to_original_name(n) for n in family.fused_stacks if n not in released]
    if missing:
        raise CorruptCheckpointError(f"layer {layer}: has no {missing[0]} beside the other expert stack")
    _check_router(family, config, layer, tensors)
    return {**out, **{prefix + name: tensor for name, tensor in released.items()}}


def _stack_shapes(family: Family, config: Any) -> dict[str, tuple[int, int, int]]:
    """The runtime shape of each expert stack, by config.json."""
    experts, hidden, size = (
        family.num_experts(config),
        family.expert_input_size(config),
        family.expert_size(config),
    )
    inputs = len(family.input_projections) * size
    return {family.fused_gate_up: (experts, inputs, hidden), family.fused_down: (experts, hidden, size)}


def is_released_stack(family: Family, config: Any, local: str, shape: Sequence[int]) -> bool:
    """Whether ``local`` (a name in its layer) is an expert stack in the transposed orientation that the
    family's releases store. Told apart by shape, as transformers does: a stack that is square in its
    last two dimensions (hidden size equal to twice or once the expert size) reads as runtime."""
    runtime = _stack_shapes(family, config).get(local) if family.transposed_stacks else None
    return (
        runtime is not None
        and tuple(shape) != runtime
        and tuple(shape) == (runtime[0], runtime[2], runtime[1])
    )


def _has_transposed_stacks(family: Family, config: Any, tensors: dict[str, torch.Tensor]) -> bool:
    return any(
        is_released_stack(family, config, _split_layer_prefix(n)[1], t.shape) for n, t in tensors.items()
    )


def _orient_stacks(
    family: Family, config: Any, tensors: dict[str, torch.Tensor], *, to_runtime: bool
) -> dict[str, torch.Tensor]:
    """A layer with its expert stacks turned from the releases' orientation to the runtime one, or
    back: both stacks must be in the orientation they are turned from, or the layer is corrupt."""
    shapes = _stack_shapes(family, config)
    out = dict(tensors)
    for name, tensor in tensors.items():
        runtime = shapes.get(_split_layer_prefix(name)[1])
        if runtime is None:
            continue
        source = (runtime[0], runtime[2], runtime[1]) if to_runtime else runtime
        if tuple(tensor.shape) != source:
            raise CorruptCheckpointError(
                f"{name} has shape {list(tensor.shape)}, but config.json implies {list(source)} "
                f"(the other stack of its layer is {'transposed' if to_runtime else 'not'})"
            )
        out[name] = tensor.transpose(1, 2).contiguous()
    return out


def as_runtime_orientation(
    family: Family, config: Any, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A layer with expert stacks stored as the family's releases store them (transposed) turned to the
    runtime orientation; any other layer as it is. Shapes are checked on what this returns."""
    if _has_transposed_stacks(family, config, tensors):
        return _orient_stacks(family, config, tensors, to_runtime=True)
    return dict(tensors)


def is_fused(tensors: Iterable[str]) -> bool:
    """Whether a layer's tensors (their names, or a dict of them) hold stacked experts (the runtime
    layout) rather than per-expert ones (in whichever block: no per-expert name ends like a stack)."""
    return any(is_stack_name(n) for n in tensors)


def runtime_layer(
    family: Family, config: Any, layer: int | None, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One layer in the runtime layout whichever layout it was saved in: what ``quantize`` and ``verify``
    read, so that a checkpoint written by :func:`fuse` (or by transformers with
    ``save_original_format=False``) is as good a source as the original. A layer that mixes stacked and
    per-expert experts is corrupt."""
    if not is_fused(tensors):
        return fuse_layer(family, config, layer, tensors)
    expert_re = family.original_expert_re()
    for name in tensors:
        if expert_re.match(_split_layer_prefix(name)[1]):
            raise CorruptCheckpointError(f"{name}: a per-expert tensor beside the layer's stacked experts")
    _check_stacked(family, config, layer, tensors)
    return as_runtime_orientation(family, config, tensors)


def _check_stacked(family: Family, config: Any, layer: int | None, tensors: dict[str, torch.Tensor]) -> None:
    """A layer of stacked experts holds both stacks, in a layer config.json makes sparse: checked on the
    header-only plan, since a missing stack would otherwise fail only when the layer is run."""
    if layer is None or layer >= config.num_hidden_layers:  # MTP layers are carried as they are
        return
    if not family.is_moe_layer(config, layer):
        raise CorruptCheckpointError(f"layer {layer} holds experts but config.json makes it a dense layer")
    present = {_split_layer_prefix(name)[1] for name in tensors}
    missing = [name for name in family.fused_stacks if name not in present]
    if missing:
        raise CorruptCheckpointError(f"layer {layer}: has no {missing[0]} beside the other expert stack")


def _released_names(family: Family, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused layer of a family whose releases stack experts under names of their own, renamed back."""
    out = {}
    for name, tensor in tensors.items():
        prefix, local = _split_layer_prefix(name)
        if local not in family.fused_stacks and family.to_fused_name(local) in family.fused_stacks:
            raise UnsupportedModelError("checkpoint is not fused (its expert stacks are as released)")
        if family.original_expert_re().match(local):
            raise UnsupportedModelError(
                f"{name}: checkpoint is not fused (it already has per-expert weights)"
            )
        out[prefix + family.to_original_name(local)] = tensor
    return out


def concat_experts(
    *projections: Sequence[torch.Tensor],
) -> tuple[Concatenated, Concatenated] | tuple[torch.Tensor, torch.Tensor]:
    """:func:`~moeconvert.layout.stack_experts` without the copy: row-major ``gate_up [E, 2I, H]`` is
    expert 0's gate rows, then its up rows, then expert 1's... (``up [E, I, H]`` each expert's up in
    turn), and ``down [E, H, I]`` is each expert's down in turn, so the writer can stream the experts'
    own bytes. Experts that a stack would convert (mixed dtypes or shapes) or that are not contiguous
    are stacked for real."""
    *inputs, down = projections
    parts = [p for q in projections for p in q]
    if not parts or any(
        p.dtype != parts[0].dtype or not p.is_contiguous() or p.shape != q[0].shape
        for q in projections
        for p in q
    ):
        return stack_experts(*projections)
    size, hidden = inputs[0][0].shape
    per_expert = [t for ts in zip(*inputs, strict=True) for t in ts]
    return (
        Concatenated(tuple(per_expert), parts[0].dtype, (len(down), len(inputs) * size, hidden)),
        Concatenated(tuple(down), down[0].dtype, (len(down), *down[0].shape)),
    )


def _check_experts(
    family: Family, config: Any, prefix: str, layer: int, experts: dict[tuple[int, str], torch.Tensor]
) -> None:
    moe = family.is_moe_layer(config, layer)
    if not moe:
        if experts:
            raise CorruptCheckpointError(
                f"layer {layer} holds experts but config.json makes it a dense layer"
            )
        return
    count = family.num_experts(config)
    found = sorted({e for e, _ in experts})
    if found != list(range(count)):
        raise CorruptCheckpointError(
            f"layer {layer}: config.json says {count} experts, the checkpoint has {len(found)}"
            + (f" (indices {found[0]}..{found[-1]})" if found else "")
        )
    for e in range(count):
        for projection in family.projections:
            if (e, projection) not in experts:
                raise CorruptCheckpointError(f"layer {layer}: expert {e} has no {projection} weight")
    dtypes = sorted({str(tensor.dtype).removeprefix("torch.") for tensor in experts.values()})
    if len(dtypes) > 1 or not next(iter(experts.values())).dtype.is_floating_point:
        raise CorruptCheckpointError(
            f"layer {layer}: experts stored as {', '.join(dtypes)}: their stacks take one floating dtype "
            "(re-export the checkpoint in one)"
        )
    hidden, size = family.expert_input_size(config), family.expert_size(config)
    implied = {name: (size, hidden) for name in family.projections} | {
        family.projections[family.down_projection]: (hidden, size)
    }
    for (e, projection), tensor in sorted(experts.items()):
        _check_shape(
            prefix + family.original_expert_name(e, family.projections.index(projection)),
            tensor,
            implied[projection],
            f"{family.expert_size_key}={size}, hidden_size={hidden}",
        )


def _check_router(family: Family, config: Any, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    """The router scores every expert from the hidden state: [E, H] by config.json."""
    if not family.is_moe_layer(config, layer):
        return
    count, hidden = family.num_experts(config), int(config.hidden_size)
    for name, tensor in tensors.items():
        if family.to_fused_name(_split_layer_prefix(name)[1]) == f"{family.router}.weight":
            _check_shape(
                name, tensor, (count, hidden), f"{family.num_experts_key}={count}, hidden_size={hidden}"
            )


def _check_shape(name: str, tensor: torch.Tensor, implied: tuple[int, ...], why: str) -> None:
    """Checked on the header-only plan, before anything is written: a tensor that contradicts
    config.json would otherwise convert "fine" and fail only when the output is loaded."""
    if tuple(tensor.shape) != implied:
        raise CorruptCheckpointError(
            f"{name} has shape {list(tensor.shape)}, but config.json implies {list(implied)} ({why})"
        )


def unfuse_layer(
    family: Family, config: Any, layer: int | None, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse_layer`: stacked experts back to per-expert tensors and original names
    (MTP layers, carried by fuse as they were, are carried back), or for a family whose releases stack
    them transposed (Qwen3-VL-MoE), back to that orientation."""
    if layer is not None and layer >= config.num_hidden_layers:
        return dict(tensors)
    if family.transposed_stacks and is_fused(tensors):
        if not family.runtime_releases:  # back as released
            if _has_transposed_stacks(family, config, tensors):
                raise UnsupportedModelError("checkpoint is not fused (its expert stacks are as released)")
            return _orient_stacks(family, config, tensors, to_runtime=False)
        tensors = as_runtime_orientation(family, config, tensors)  # Llama 4's: split below, per expert
    if family.released_stacks:  # back to the releases' names
        return _released_names(family, tensors)
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, torch.Tensor] = {}
    prefix = ""
    for name, tensor in tensors.items():
        prefix, local = _split_layer_prefix(name)
        if local in family.fused_stacks:
            stacked[local] = tensor
        elif family.original_expert_re().match(local):
            raise UnsupportedModelError(
                f"{name}: checkpoint is not fused (it already has per-expert weights)"
            )
        else:
            out[prefix + family.to_original_name(local)] = tensor
    if not stacked:
        return out
    gate_up_name, down_name = family.fused_stacks
    if set(stacked) != {gate_up_name, down_name}:
        raise CorruptCheckpointError(f"layer {layer}: needs both {gate_up_name} and {down_name}")
    try:
        per_projection = unstack_experts(
            stacked[gate_up_name], stacked[down_name], parts=len(family.input_projections)
        )
    except ValueError as err:
        raise CorruptCheckpointError(f"layer {layer}: {err}") from None
    for e, weights in enumerate(zip(*per_projection, strict=True)):
        for projection, weight in enumerate(weights):
            out[prefix + family.original_expert_name(e, projection)] = weight
    return out


def model_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in transformers' own model for ``config``, built on the meta device (no
    memory): the reference that a checkpoint's attention, MLP, norm and embedding shapes must match.
    Expert stacks are given as every command holds them (:func:`held_shapes`)."""
    from .forward import text_causal_lm

    try:
        with torch.device("meta"):
            model = text_causal_lm(config)
    except Exception as err:  # any value transformers' modules cannot build from
        raise UnsupportedModelError(
            f"transformers cannot build a {config.model_type} model from this config.json ({first_line(err)})"
        ) from None
    return held_shapes(model, config)


def held_shapes(model: torch.nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in ``model`` (transformers' model for ``config``), with expert stacks as
    every command holds them, [E, 2I, H] and [E, H, I], where the module holds their transpose (Llama
    4's)."""
    from .forward import turned_stacks

    turned = turned_stacks(config)
    return {
        name: (s[0], s[2], s[1]) if turned and is_stack_name(name) else s
        for name, s in ((name, tuple(t.shape)) for name, t in model.state_dict().items())
    }


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a tensor whose shape contradicts config.json (names transformers' model does not have,
    e.g. per-expert checkpoint names or quantization scales, are checked elsewhere or not at all).
    ``expected`` holds the text model's names (:func:`~moeconvert.checkpoint.text_model_name`)."""
    for name, tensor in tensors.items():
        shape = expected.get(text_model_name(name))
        if shape is not None:
            _check_shape(name, tensor, shape, "transformers' model for this config")


def check_layer_count(layers: Iterable[int | None], config: Any) -> None:
    """Refuse decoder layers other than config.json's: 0..num_hidden_layers-1, then at most
    ``num_nextn_predict_layers`` MTP layers (DeepSeek-V3), which are carried as they are. A config that
    undercounts would pass real layers off as MTP layers, one that overcounts would not load."""
    present = sorted(layer for layer in layers if layer is not None)
    count, mtp = config.num_hidden_layers, getattr(config, "num_nextn_predict_layers", 0) or 0
    if (
        present[:count] != list(range(count))
        or present[count:] != list(range(count, len(present)))
        or (len(present) > count + mtp)
    ):
        held = f"layers {present[0]}..{present[-1]}" if present else "no layers"
        held += "" if present == list(range(len(present))) else f" (with gaps: {len(present)} layers)"
        says = f"{count} decoder layers" + (f" and up to {mtp} MTP layers" if mtp else "")
        raise CorruptCheckpointError(f"config.json says {says}, the checkpoint has {held}")


def check_against_config(reader: ShardedReader, family: Family, config: Any) -> None:
    """Refuse a checkpoint whose tensors contradict its config.json (layer and expert counts, shapes),
    reading headers only: what fuse and quantize check before writing anything, for callers that
    write nothing (``inspect``, whose counts assume that the config describes the tensors). Either
    layout."""
    check_layer_count(reader.layer_names(), config)
    expected = model_shapes(config)
    for layer, names in iter_groups(reader):
        stored = reader.meta_tensors(names)
        check_shapes(as_runtime_orientation(family, config, stored), expected)
        check_shapes(runtime_layer(family, config, layer, stored), expected)


def relayout(
    model: str,
    output: str | Path,
    layer_fn: Callable[[Family, Any, int | None, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    desc: str = "relayout",
) -> Path:
    """Stream ``layer_fn`` over every layer of MODEL into a new checkpoint folder at ``output``."""
    folder = resolve_model(model, revision, token)
    raw_config = read_config(folder)
    family = family_for(raw_config)
    plain = full_precision_config(raw_config, desc)  # FP8 sources are written dequantized
    config = load_config(plain)
    shard_cap = parse_size(max_shard_size)
    output = Path(output)
    with open_reader(folder, raw_config) as reader:
        reader.views = True  # no copies: each group is written and dropped as a whole
        groups = list(iter_groups(reader))
        check_layer_count((layer for layer, _ in groups), config)
        expected = model_shapes(config)
        plan = []
        for layer, names in groups:
            stored = reader.meta_tensors(names)
            converted = layer_fn(family, config, layer, stored)
            for side in (stored, converted):  # whichever side carries transformers' runtime names
                check_shapes(as_runtime_orientation(family, config, side), expected)
            plan.append(plan_group(converted))
        needs = sum(t.nbytes for group in plan for t in group) + sum(
            f.stat().st_size for f in side_files(folder)
        )
        staged = OutputFolder(output, force=force, source=folder, needs_bytes=needs)
        with _write_errors(output), staged as staging:
            writer = ShardedWriter(staging, plan, shard_cap)
            try:
                _stream(reader, writer, groups, lambda layer, t: layer_fn(family, config, layer, t), desc)
            finally:
                writer.abort()
            writer.finish()
            for path in side_files(folder):
                shutil.copyfile(path, staging / path.name)
            if plain is not raw_config:  # dequantized: the fp8 config no longer applies
                (staging / "config.json").write_text(json.dumps(plain, indent=2) + "\n")
            write_manifest(staging, writer.digests)
    return output


@contextlib.contextmanager
def _write_errors(output: Path) -> Iterator[None]:
    """A full disk or an I/O error: one line (the staging folder is already gone, nothing is at ``output``)."""
    try:
        yield
    except OSError as err:
        raise OutputWriteError(
            f"cannot write {output} ({err.strerror or err}); nothing was written: free space or fix the cause "
            "and run the same command again"
        ) from None


def _stream(reader: ShardedReader, writer: ShardedWriter, groups: list, convert: LayerFn, desc: str) -> None:
    """Write every group in turn while the next one is prefetched from disk on a helper thread."""
    total = sum(t.nbytes for g in writer.groups for t in g)
    with (
        ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetcher,
        tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True) as bar,
    ):
        for index, (layer, names) in enumerate(groups):
            bar.set_postfix_str(
                f"layer {layer}/{len(groups) - 2}" if layer is not None else "embeddings/head"
            )
            if index + 1 < len(groups):
                prefetcher.submit(reader.prefetch, groups[index + 1][1])
            written = writer.write_group(index, convert(layer, reader.get_many(names)))
            bar.update(written)


def fuse(
    model: str,
    output: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> Path:
    """Re-lay MODEL's experts into stacked tensors, exactly as transformers 5 saves them.

    Writes ``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2I, H] and ``...down_proj`` [E, H, I]
    per MoE layer, renames other tensors as transformers does, and copies config, tokenizer and chat
    template. The result loads with ``AutoModelForCausalLM.from_pretrained`` as it is.

    Raises:
        MoeConvertError: bad MODEL, unsupported family, corrupt checkpoint, or existing output.
    """
    return relayout(
        model,
        output,
        _layer_as_transformers_saves,
        revision=revision,
        token=token,
        max_shard_size=max_shard_size,
        force=force,
        desc="fuse",
    )


def _layer_as_transformers_saves(
    family: Family, config: Any, layer: int | None, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """:func:`fuse`'s layer: stacks written from the experts' own bytes, or where transformers' module
    holds them transposed (Llama 4's) turned so."""
    if not family.runtime_transposed:
        return fuse_layer(family, config, layer, tensors, stack=concat_experts)
    return _orient_stacks(family, config, fuse_layer(family, config, layer, tensors), to_runtime=False)


def unfuse(
    model: str,
    output: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> Path:
    """Undo :func:`fuse`: per-expert weights under the family's original names, bit for bit."""
    return relayout(
        model,
        output,
        unfuse_layer,
        revision=revision,
        token=token,
        max_shard_size=max_shard_size,
        force=force,
        desc="unfuse",
    )
