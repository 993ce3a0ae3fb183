"""How much memory a quantize run needs at its peak, from the plan's shapes alone (a dry run).

The peak is the layer that needs most, at one of two points of its work:

- **calibrating**: the layer's source tensors, the layer again in the forward dtype (less the routed
  experts' down projection, which a statistics pass never reads), the running Hessian sums of its GPTQ
  targets, the calibration activations and one batch's temporaries;
- **solving** a target, one expert at a time at least: the source tensors, the sums of the targets not
  yet solved, the packed outputs and the codes of those solved, that target's layer-wide prior, the
  solver's buffers
  (:func:`solve_working_bytes`, the budget ``auto_experts_per_chunk`` also uses), and the activations
  when they stay in memory (below ``SPILL_BYTES``).

A layer whose gate/up sums are replayed (:class:`~moeconvert.quant.hessian.ReplayedAccumulator`) holds
the experts' inputs and routing in their place until its gate/up target is solved, and the sums of one
chunk of experts while it is.

Plus the allocator's slack and the fixed cost of torch and transformers. This is what the run needs, not
all it may take: with memory to spare it solves several experts at once (up to half the free memory;
on a CPU with held sums, up to ``CPU_CHUNK_BYTES`` of solver memory).
docs/PERFORMANCE.md compares the estimate with measured peaks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .families.base import STACKS, block_of, in_block
from .quant.hessian import CHUNK_ROWS, SUMS_DTYPE

if TYPE_CHECKING:
    from .pipeline import Target

FIXED_BYTES = 512 << 20  # the interpreter, torch, transformers and the model skeleton (measured)
# The allocator's share: freed temporaries that glibc keeps in its heaps until the layer ends. Measured
# peaks of one-expert-at-a-time runs came out 5-12% above the sum of what is held.
ALLOCATOR_SLACK = 1.1


def solve_working_bytes(in_features: int, out_features: int, experts: int) -> int:
    """The solver's memory for ``experts`` problems at once, besides their Hessians (finalized in their
    sums' memory, which the factors then overwrite): per expert its float32 working weights and codes;
    shared, three Hessian-sized buffers: the factorization's two, and one for what is not itemized (the
    column loop's pieces, the allocator's leftovers; docs/PERFORMANCE.md, "Estimating the peak before a
    run")."""
    hessian = in_features * in_features * 4
    return experts * 5 * in_features * out_features + 3 * hessian


def replay_bytes_per_expert(in_features: int, dtype: torch.dtype) -> int:
    """A replayed stack's memory per expert of a chunk: its sums and its rows waiting for a full chunk."""
    return in_features * in_features * (torch.finfo(dtype).bits // 8) + CHUNK_ROWS * in_features * 4


def statistics_unread(
    targets: Iterable[Target], routed_output_readers: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """Layer tensors a statistics pass never reads: the routed experts' down projection, once any GPTQ
    target is among the routed experts. Their hook computes ``act(gate) * up`` itself and their own
    forward pass is skipped (``LayerStatistics.hooks``), so the pass neither fills nor widens it; not
    where a GPTQ target reads the experts' output (``routed_output_readers``, a family's
    ``reads_routed_output``), which the pass then computes. The pipeline and this estimate both take the
    rule from here."""
    targets = [t for t in targets if t.scheme.method == "gptq"]
    if runs_routed_experts(targets, routed_output_readers):
        return ()
    hooked = [t.local for t in targets if t.kind in ("gate_up", "down")]
    return (in_block(block_of(hooked[0]), STACKS[1]),) if hooked else ()


def runs_routed_experts(targets: Iterable[Target], routed_output_readers: tuple[str, ...]) -> bool:
    """Whether a statistics pass must run the routed experts: a GPTQ target reads their output."""
    return bool(routed_output_readers) and any(
        t.scheme.method == "gptq" and t.local.startswith(routed_output_readers) for t in targets
    )


def _accumulating_bytes(target: Target, shape: tuple[int, ...], routed_rows: int | None) -> int:
    """What a target's accumulator holds besides its sums while rows come in: each expert's rows waiting
    for a full chunk, at most a chunk per expert and at most every routed row (``routed_rows``, when
    known; 64 rows per expert never fill one). Chunk products go straight into the sums."""
    in_features = shape[-1]
    experts = 1 if target.kind == "dense" else shape[0]
    waiting = experts * CHUNK_ROWS if routed_rows is None else min(experts * CHUNK_ROWS, routed_rows)
    return waiting * in_features * 4


def _hessian_bytes(in_features: int) -> int:
    """One expert's (or one dense Linear's) running sums, or its finalized Hessian."""
    return in_features * in_features * (torch.finfo(SUMS_DTYPE).bits // 8)


# a projection -> the siblings, in the order tried, whose very input it takes (and whose hook fires first)
_SAME_INPUT = {
    "k_proj": ("q_proj",),
    "v_proj": ("q_proj",),
    "up_proj": ("gate_proj",),
    "kv_a_proj_with_mqa": ("q_a_proj", "q_proj"),  # latent attention, with and without a query LoRA
}


def _output_bytes(target: Target, shape: tuple[int, ...]) -> int:
    """A quantized target's output tensors: packed codes, and a scale and zero point per group."""
    in_features, weights = shape[-1], math.prod(shape)
    groups = weights // in_features * target.scheme.groups(in_features)
    return weights * target.scheme.bits // 8 + groups * 8


def stored_bytes(target: Target, tensor: torch.Tensor) -> int:
    """What a quantized target takes in the output's shards: packed codes, and per group a scale (in the
    weight's dtype at most) and a packed zero point (GPTQ's format stores one even when symmetric)."""
    in_features, weights = tensor.shape[-1], tensor.numel()
    groups = weights // in_features * target.scheme.groups(in_features)
    return weights * target.scheme.bits // 8 + groups * (tensor.element_size() + target.scheme.bits // 8)


def _solved_bytes(target: Target, shape: tuple[int, ...]) -> int:
    """A solved target until the layer's output pass: its output tensors, and its codes (a byte per
    weight, a float32 scale and an int32 zero point per group), which that pass decodes."""
    in_features, weights = shape[-1], math.prod(shape)
    return (
        _output_bytes(target, shape)
        + weights
        + weights // in_features * target.scheme.groups(in_features) * 8
    )


def _own_accumulator(target: Target, targets: list[Target]) -> bool:
    """False for a projection that takes its sibling's very input (k and v after q, up after gate) and
    so shares its accumulator (``LayerStatistics._shares_input``)."""
    return _input_owner(target, targets) == target.local


def _solve_rows(target: Target, gptq: list[Target], local: dict[str, torch.Tensor]) -> int:
    """Rows of the solve that ``target`` starts: a dense Linear is solved with the siblings that share its
    sums, as one stack (``LayerStatistics.solve_groups``), at the first of them in the pipeline's order;
    the others of its group start none."""
    if target.kind != "dense":
        return local[target.local].shape[-2]
    group = [t for t in gptq if t.kind == "dense" and _input_owner(t, gptq) == _input_owner(target, gptq)]
    return sum(local[t.local].shape[-2] for t in group) if group[0] is target else 0


def _input_owner(target: Target, targets: list[Target]) -> str:
    """The target whose accumulator ``target`` adds to: its sibling of the same input, or itself."""
    parent, _, leaf = target.local.removesuffix(".weight").rpartition(".")
    names = {t.local for t in targets}
    siblings = (f"{parent}.{sibling}.weight" for sibling in _SAME_INPUT.get(leaf, ()))
    return next((name for name in siblings if name in names), target.local)


def _sums_bytes(target: Target, shape: tuple[int, ...]) -> int:
    """Running Hessian sums of one GPTQ target: one per expert, or one for a dense Linear."""
    return (1 if target.kind == "dense" else shape[0]) * _hessian_bytes(shape[-1])


def layer_peak_bytes(
    targets: Iterable[Target],
    local: dict[str, torch.Tensor],
    *,
    activation_bytes: int,
    spilled: bool,
    batch_tokens: int,
    hidden_size: int,
    forward_bytes: int,
    replayed: bool = False,
    routed_rows: int | None = None,
    routed_output_readers: tuple[str, ...] = (),
) -> int:
    """Peak memory of one layer's quantize step (without the fixed cost); ``local`` holds the layer's
    tensors (meta tensors will do), named as the targets name them. ``activation_bytes`` is 0 for a run
    without calibration (round-to-nearest only), which has no forward pass. ``replayed``: the gate/up
    sums are formed a chunk of experts at a time from the kept inputs (the module docstring).
    ``routed_rows``: the rows the routed experts receive in all (calibration tokens times top-k), if
    known. ``routed_output_readers``: the family's ``reads_routed_output``."""
    targets = list(targets)
    source = sum(t.numel() * t.element_size() for t in local.values())
    if not activation_bytes:  # each target in float32, its codes and its decoded copy, one at a time
        return source + max((local[t.local].numel() * 9 for t in targets), default=0)
    gptq = sorted((t for t in targets if t.scheme.method == "gptq"), key=lambda t: t.local)
    forward = sum(t.numel() * forward_bytes for t in local.values() if t.is_floating_point())
    unread = sum(
        local[name].numel() * forward_bytes
        for name in statistics_unread(gptq, routed_output_readers)
        if name in local
    )
    sums = [_sums_bytes(t, tuple(local[t.local].shape)) for t in gptq]
    widest = max((local[t.local].shape[-2] for t in gptq), default=hidden_size)
    batch = batch_tokens * (4 * hidden_size + widest) * forward_bytes
    owners = [t for t in gptq if _own_accumulator(t, gptq)]
    replaying = {t.local for t in gptq if replayed and t.kind == "gate_up"}
    accumulating = sum(
        _accumulating_bytes(t, tuple(local[t.local].shape), None if t.kind == "dense" else routed_rows)
        for t in owners
        if t.local not in replaying
    )
    kept_inputs = {  # the replayed stack's inputs (the layer's activations again) and routing masks
        t.local: activation_bytes
        + activation_bytes // (hidden_size * forward_bytes) * local[t.local].shape[0]
        for t in gptq
        if t.local in replaying
    }
    sums = [kept_inputs.get(t.local, size) if t in owners else 0 for size, t in zip(sums, gptq, strict=True)]
    calibrating = (
        source + forward - unread + sum(sums) + accumulating + activation_bytes + batch if gptq else 0
    )
    solving = 0
    for index, target in enumerate(gptq):  # in the pipeline's order; a solved target's sums are freed
        shape = tuple(local[target.local].shape)
        in_features, out_features = shape[-1], _solve_rows(target, gptq, local)
        if not out_features:  # solved with the first of its group
            continue
        # a stack's layer-wide prior; a dense Linear's finalized Hessian (q, k and v share their sums)
        working = solve_working_bytes(in_features, out_features, 1) + _hessian_bytes(in_features)
        if target.local in replaying:
            working += replay_bytes_per_expert(in_features, SUMS_DTYPE)
        done = sum(_solved_bytes(t, tuple(local[t.local].shape)) for t in gptq[:index])
        held = source + sum(sums[index:]) + done + (0 if spilled else activation_bytes)
        solving = max(solving, held + working)
    outputs = sum(_output_bytes(t, tuple(local[t.local].shape)) for t in targets)
    running = source + forward + outputs + activation_bytes + batch  # the output pass, layers without GPTQ
    return max(calibrating, solving, running)
