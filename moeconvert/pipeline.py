"""``quantize``: the streamed, true-sequential, layer-by-layer driver.

Embeddings first, then one decoder layer at a time: read only that layer's tensors, run the calibration
hidden states through it with the family's own transformers modules while hooks gather Hessians (experts
from the tokens the model's router really sends them), solve every target of the layer (all experts of a
projection at once), write the layer, and hand the *quantized* layer's outputs to the next layer.
Peak memory is one layer plus the calibration activations.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .card import REPORT_NAME, library_versions, write_card
from .checkpoint import LAYER_RE, is_tower, iter_groups, layer_prefix, parse_size, text_model_name
from .distributed import Ranks, all_gather_cat, all_gather_list, barrier, ordered_sum
from .distributed import current as current_ranks
from .errors import BadInputError, InterruptedRunError, OutputWriteError
from .estimate import (
    ALLOCATOR_SLACK,
    FIXED_BYTES,
    layer_peak_bytes,
    replay_bytes_per_expert,
    runs_routed_experts,
    solve_working_bytes,
    statistics_unread,
    stored_bytes,
)
from .families import STACKS, UNGATED_STACKS, Family, block_of, family_for, in_block, load_config
from .formats import QuantFormat, get_format
from .formats.base import QuantizedModule, fitting_group_size
from .formats.module_rules import carried_rules, engine_unquantized_modules, vllm_split_modules
from .forward import LayerwiseModel
from .fp8 import full_precision_config, header_reader, open_reader, source_dtype
from .manifest import write_manifest
from .memory import available_bytes, memory_budget_bytes, release_freed_memory
from .output_folder import OutputFolder
from .parts import PartsWriter
from .progress import progress_bar
from .quant.calibration import calibration_tokens, positions_note, tokens_digest
from .quant.gptq import gptq_quantize
from .quant.hessian import HessianAccumulator, ReplayedAccumulator, routed_rows, rows_for_bf16_units
from .quant.rtn import QuantizedWeight, rtn_quantize
from .quant.scheme import Scheme
from .quant.targets import Rule, TargetPolicy
from .recipe import check_thresholds
from .relayout import check_layer_count, check_shapes, held_shapes, is_fused, runtime_layer
from .resume import Progress, RunState, pause_for_tests
from .source import describe_source, parse_model_ref, read_config, read_metadata, resolve_model, side_files

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass(frozen=True)
class Target:
    """One quantizable weight of a layer, in runtime (fused) naming, with its output module names."""

    local: str  # runtime name within the layer, e.g. "self_attn.q_proj.weight" or "mlp.experts.down_proj"
    kind: str  # "dense", "gate_up" or "down"
    scheme: Scheme
    aliases: tuple[str, ...]  # full module names the policy matched against
    modules: int = 1  # Linear modules of the output it becomes (experts x projections)


@dataclass
class QuantizeOptions:
    """Everything of a quantize run besides the model and the schemes."""

    format: str = "compressed-tensors"
    calib: str | None = None
    samples: int = 128
    seq_len: int = 2048
    batch_tokens: int = 8192
    device: str = "auto"
    calibrate_all_experts: bool = False
    min_tokens: int = 128
    experts_per_chunk: int | None = None  # GPTQ problems solved at once; None: as many as fit in memory
    verify_thresholds: dict[str, float] = field(default_factory=dict)  # max_kl, min_top1, max_layer_error
    seed: int = 0
    max_shard_size: str | int = "5GB"
    # dtype of the calibration forward passes: "float32", or "checkpoint" (the weights' own dtype, as the
    # model is served: half the layer's memory, and bf16 matmuls run 2-3x faster on recent CPUs)
    forward_dtype: str = "float32"
    # the experts' gate/up statistics: "held" (running sums of every expert), "replayed" (the inputs kept
    # and summed a chunk of experts at a time as they are solved: same bytes out, for DeepSeek-V3-wide
    # layers whose sums outgrow memory), or "auto": replayed when the layer would not fit with them held
    expert_statistics: str = "auto"


@dataclass
class LayerReport:
    layer: int
    targets: int
    tokens_per_expert: list[int] = field(default_factory=list)
    starved_experts: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class QuantizeReport:
    model: str
    output: str
    scheme: dict[str, Any]
    format: str
    calibration: dict[str, Any]
    device: str
    quantized_modules: int
    kept_modules: list[str]
    layers: list[LayerReport]
    seconds: float = 0.0
    verify: dict[str, Any] | None = None  # the parity report of the fresh output, when verified
    source: dict[str, Any] = field(default_factory=dict)  # id, revision, license (for the model card)
    sizes: dict[str, int] = field(default_factory=dict)  # weight bytes of the source and the output
    versions: dict[str, str] = field(default_factory=dict)  # of the libraries that made the output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BadInputError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda asked for, but torch sees no CUDA device")
    chosen = torch.device(device)
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise BadInputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def default_output(model: str, scheme: Scheme) -> Path:
    """``<model name>-<scheme label>`` in the working folder, e.g. ``Mixtral-8x7B-v0.1-w4g128-gptq``."""
    ref = parse_model_ref(model)
    name = ref.repo_id.split("/")[-1] if ref.repo_id else Path(model).resolve().name
    return Path.cwd() / f"{name}-{scheme.label}"


# ----------------------------------------------------------------------------------------------- planning


def layer_targets(
    family: Family,
    layer_module: nn.Module,
    prefix: str,
    local_tensors: dict[str, torch.Tensor],
    policy: TargetPolicy,
) -> tuple[list[Target], list[str]]:
    """Targets of one layer, and the Linear modules the policy keeps in full precision (their names as
    in the checkpoint)."""
    targets: list[Target] = []
    kept: list[str] = []
    for local in sorted(local_tensors):
        if local in family.fused_stacks:
            kind = "gate_up" if local == family.fused_gate_up else "down"
            projections = _stack_projections(family, kind)
            names = [prefix + family.original_expert_name(0, p)[: -len(".weight")] for p in projections]
            aliases = (names[0], prefix + local)
            scheme = policy.scheme_for(*aliases)
            if any(policy.scheme_for(name, prefix + local) != scheme for name in names[1:]):
                raise BadInputError(f"{prefix}: expert gate and up projections must share a scheme")
            experts = local_tensors[local].shape[0]
            if scheme is None:
                kept.extend(
                    prefix + family.original_expert_name(e, p)[: -len(".weight")]
                    for e in range(experts)
                    for p in projections
                )
                continue
            targets.append(Target(local, kind, scheme, aliases, len(projections) * experts))
            continue
        if not local.endswith(".weight") or local_tensors[local].dim() != 2:
            continue
        module_path = local[: -len(".weight")]
        if not isinstance(layer_module.get_submodule(module_path), nn.Linear):
            continue
        original = prefix + family.to_original_name(local)[: -len(".weight")]
        aliases = (original, prefix + module_path)
        scheme = policy.scheme_for(*aliases)
        if scheme is None:
            kept.extend(dict.fromkeys(aliases))
        else:
            targets.append(Target(local, "dense", scheme, aliases))
    return targets, kept


def _stack_projections(family: Family, kind: str) -> Sequence[int]:
    """Indices in ``family.projections`` of the per-expert weights an expert stack of ``kind`` holds:
    gate and up (or up alone) for "gate_up", down for "down"."""
    return family.input_projections if kind == "gate_up" else (family.down_projection,)


# -------------------------------------------------------------------------------------------- calibration


# Calibration activations this large leave memory while a layer is solved (they are on disk already,
# in the resume record); smaller ones stay, and save the read.
SPILL_BYTES = 1 << 30


class StatisticsComplete(Exception):
    """Raised by the last statistics hook of a forward pass: the rest of the layer's computation (often
    the routed experts themselves, whose inputs the hook has just taken) would be thrown away."""


class LayerStatistics:
    """GPTQ statistics of one layer's targets that this rank owns, and the hooks that gather them.

    Dense targets see every token their Linear sees; the stacked experts see, per expert, the tokens the
    router sends it (gate/up) and their ``act(gate) * up`` (down). In one process the hooks add rows as the
    layer runs. In an expert-parallel job (:mod:`moeconvert.distributed`) the hooks only record what they
    saw; :meth:`exchange` then shares each batch's records and every owner adds them in batch order.
    """

    def __init__(
        self,
        layer: nn.Module,
        targets: list[Target],
        all_experts: bool,
        ranks: Ranks,
        replay_gate_up: bool = False,
        routed_output_readers: tuple[str, ...] = (),
        scaled_by: str | None = None,
        transposed: bool = False,
    ) -> None:
        """``scaled_by``: the in-layer name of the router whose scores scale the experts' input (Llama 4's,
        :attr:`Family.scales_expert_inputs`); ``transposed``: whether the layer's module holds the
        expert stacks transposed (:attr:`Family.runtime_transposed`)."""
        self.ranks, self.all_experts = ranks, all_experts
        self.transposed = transposed
        self.router: nn.Module | None = None  # set below where its scores scale the experts' input
        # the experts' own forward runs only where a calibrated Linear reads its output
        self.skips_routed = self.skips_routed_forward and not runs_routed_experts(
            targets, routed_output_readers
        )
        self.fired: set[str] = set()  # hooks run in this batch's forward pass
        self.taken: list[tuple[torch.Tensor, str]] = []  # this pass's dense inputs and their first hook
        self.accumulators: dict[str, HessianAccumulator | ReplayedAccumulator] = {}
        self.modules: dict[str, nn.Module] = {}
        self.records: list[tuple[str, Any]] = []  # (key, tensors, or the index of an identical record)
        self.owned = range(0)
        gptq = [t for t in targets if t.scheme.method == "gptq"]
        for index, target in enumerate(t for t in gptq if t.kind == "dense"):
            self.modules[target.local] = layer.get_submodule(target.local[: -len(".weight")])
            if ranks.owns_target(index):
                self.accumulators[target.local] = HessianAccumulator(self.modules[target.local].in_features)
        routed = [t.local for t in gptq if t.kind in ("gate_up", "down")]
        if routed:  # the stacks' runtime names, in the family's MoE block
            block = block_of(routed[0])
            experts = self.modules["experts"] = layer.get_submodule(in_block(block, "experts"))
            if scaled_by is not None:
                self.router = layer.get_submodule(scaled_by)
            self.gated = hasattr(experts, "gate_up_proj")  # else up alone (Nemotron-H's)
            stacks = STACKS if self.gated else UNGATED_STACKS
            self.gate_up_name, self.down_name = (in_block(block, stack) for stack in stacks)
            inputs = _input_stack(experts, self.gated, transposed)
            count, hidden = inputs.shape[0], inputs.shape[2]
            self.owned = ranks.experts(count)
            width = _stack(experts.down_proj, transposed).shape[2]
            gate_up = ReplayedAccumulator if replay_gate_up else HessianAccumulator
            self.accumulators[self.gate_up_name] = gate_up(hidden, len(self.owned))
            self.accumulators[self.down_name] = HessianAccumulator(width, len(self.owned))

    shares_solves: ClassVar[bool] = True  # see :meth:`solve_groups`; off only to compare against

    def solve_groups(self, targets: list[Target], local: dict[str, torch.Tensor]) -> list[list[Target]]:
        """The layer's targets in solve order, grouped where one solve serves several.

        Dense GPTQ targets that share one accumulator (q, k and v read the very same input, as do a
        dense MLP's gate and up: :meth:`_shares_input`) have one Hessian; with one scheme and one dtype
        they are solved as one stack of their rows: one factorization and one column loop, not one
        each. GPTQ treats rows independently given the Hessian (the solver's ops are elementwise along
        them, or matmuls in which they are the independent dimension), so each target gets the codes
        its own solve gives: the same bytes (``tests/test_quantize.py``). A group takes the place of
        its first member."""
        groups: dict[tuple[int, Scheme, torch.dtype] | int, list[Target]] = {}
        for index, target in enumerate(targets):
            acc = self.accumulators.get(target.local)
            shared = self.shares_solves and acc is not None and target.kind == "dense"
            key = (id(acc), target.scheme, local[target.local].dtype) if shared else index
            groups.setdefault(key, []).append(target)
        return list(groups.values())

    skips_routed_forward: ClassVar[bool] = True  # see :meth:`hooks`; off only to compare against

    @classmethod
    def unread(cls, targets: list[Target], routed_output_readers: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Layer tensors a statistics pass never reads, so it need not fill or widen them: the routed
        experts' down projection. Their hook computes ``act(gate) * up`` itself, and the experts' own
        forward pass is skipped (:meth:`hooks`): at Mixtral-8x7B's width that is 1.9 GB of float32
        weights a calibration pass no longer holds."""
        return statistics_unread(targets, routed_output_readers) if cls.skips_routed_forward else ()

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """The statistics hooks, while the block runs. The routed experts' forward pass is replaced by
        zeros meanwhile: their hook has already taken all their statistics, and nothing later in the
        layer adds any from their output (DeepSeek's shared experts, which run after them, read the
        layer's input), so computing it would be thrown away with the pass's output. Where a calibrated
        Linear reads it (Nemotron 3 Super's projection out of the experts' latent width), they run."""
        handles = []
        for key, module in self.modules.items():
            if key == "experts" and self.router is not None:  # scaled rows: from the router's scores
                handles.append(self.router.register_forward_hook(self._scaling_router_hook))
                if self.skips_routed:
                    module.forward = _no_routed_output
            elif key == "experts":
                handles.append(module.register_forward_pre_hook(self._experts_hook, with_kwargs=True))
                if self.skips_routed:  # an instance attribute: nn.Module calls it, hooks first
                    module.forward = _no_routed_output
            else:
                handles.append(module.register_forward_pre_hook(self._dense_hook(key)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            experts = self.modules.get("experts")
            if experts is not None and "forward" in vars(experts):
                del experts.forward

    @contextmanager
    def one_pass(self) -> Iterator[None]:
        """One batch's forward pass: which hooks fired, and the dense inputs taken (held only meanwhile)."""
        self.fired.clear()
        try:
            yield
        finally:
            self.taken.clear()

    def _dense_hook(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._shares_input(key, args[0]):
                self._fired(key)
            else:
                self._seen(key, (args[0].detach().reshape(-1, args[0].shape[-1]),))

        return hook

    def _shares_input(self, key: str, x: torch.Tensor) -> bool:
        """Whether an earlier hook of this pass took this very tensor (q, k and v; a dense MLP's gate and
        up): then ``key`` shares that hook's accumulator, whose sums its rows would repeat bit for bit,
        and adds nothing (a third of the work and memory for q, k and v). The inputs are held until the
        pass ends, so identity cannot be confused by a reused address. Not in an expert-parallel job,
        where another rank may own the first target (its records are shared once anyway)."""
        if self.ranks.distributed:
            return False
        first = next((owner for taken, owner in self.taken if taken is x), None)
        if first is None:
            self.taken.append((x, key))
            return False
        if self.accumulators[key] is not self.accumulators[first]:
            if int(self.accumulators[key].counts.sum()):  # rows of its own already: keep them apart
                return False
            self.accumulators[key] = self.accumulators[first]
        return True

    def _experts_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        params = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args, strict=False)) | kwargs
        count, width = module.down_proj.shape[0], module.down_proj.shape[1]  # experts, their input width
        x = params["hidden_states"].detach().reshape(-1, width)
        index = params["top_k_index"].reshape(x.shape[0], -1)
        routed = F.one_hot(index.clamp(max=count), count + 1)[..., :count].any(dim=1)  # [T, E]; no sentinels
        self._seen("experts", (x, torch.ones_like(routed) if self.all_experts else routed))

    def _scaling_router_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Where the router's score scales a token on its way into an expert (Llama 4's), the rows an
        expert sees are its tokens times their scores: one row per (token, expert) routed, with a mask
        that routes it to that expert alone. The products are the experts' inputs bit for bit."""
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        scores, logits = (t.detach().reshape(x.shape[0], -1) for t in output[:2])
        if self.all_experts:  # each expert on each token, scaled as if it had been picked
            scores = torch.sigmoid(logits.float()).to(scores.dtype)
            routed = torch.ones_like(scores, dtype=torch.bool)
        else:
            picked = logits.topk(getattr(module, "top_k", 1), dim=-1).indices
            routed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, picked, True)
        token, expert = routed.nonzero(as_tuple=True)
        rows = x.index_select(0, token) * scores[token, expert].unsqueeze(1)
        self._seen("experts", (rows, F.one_hot(expert, scores.shape[1]).bool()))

    def _seen(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        if not self.ranks.distributed:
            self._add(key, tensors)
        else:  # q, k and v (or gate and up) see the very same input: share it once, refer to it after
            same = [i for i, (_, earlier) in enumerate(self.records) if _same(earlier, tensors)]
            self.records.append((key, tensors if not same else same[0]))
        self._fired(key)

    def _fired(self, key: str) -> None:
        self.fired.add(key)
        if len(self.fired) == len(self.modules):
            raise StatisticsComplete  # nothing after this point of the forward pass adds statistics

    @torch.no_grad()
    def exchange(self, template: list[tuple[str, Any]]) -> None:
        """Share this round's records (one batch per rank; a rank without a batch sends empty ones shaped
        like ``template``) and add every rank's rows, in rank order, which is batch order."""
        mine = self.records or [
            (k, r if isinstance(r, int) else tuple(t[:0] for t in r)) for k, r in template
        ]
        shared: list[list[tuple[torch.Tensor, ...]]] = []
        for key, record in mine:
            if isinstance(record, int):
                per_rank = shared[record]
            else:
                per_rank = list(zip(*[all_gather_list(t) for t in record], strict=True))
            shared.append(per_rank)
            for pieces in per_rank:
                if pieces[0].shape[0]:
                    self._add(key, pieces)
        self.records = []

    def _add(self, key: str, tensors: tuple[torch.Tensor, ...]) -> None:
        """Push one batch's rows into the accumulators this rank owns (what a hook does in one process)."""
        if key != "experts":
            if key in self.accumulators:
                self.accumulators[key].add(tensors[0])
            return
        x, mask = tensors
        experts = self.modules["experts"]
        mask = mask[:, self.owned.start : self.owned.stop]
        gate_up = self.accumulators[self.gate_up_name]
        replayed = isinstance(gate_up, ReplayedAccumulator)
        if replayed:  # it keeps the layer's rows as they are
            gate_up.add(x, mask)
        received = routed_rows(x, mask)  # one gather serves both projections' statistics
        for local, expert in enumerate(self.owned):  # rows in the forward dtype: see hessian's "Precision"
            rows = received[local]
            if not replayed:
                gate_up.add_expert(local, rows)
            if rows.shape[0] == 0:
                continue
            down_rows = _expert_activations(experts, expert, rows, self.gated, self.transposed)
            self.accumulators[self.down_name].add_expert(local, down_rows)


def _stack(stack: torch.Tensor, transposed: bool) -> torch.Tensor:
    """An expert stack as [E, out, in], from a module that may hold it transposed (Llama 4's)."""
    return stack.transpose(1, 2) if transposed else stack


def _input_stack(experts: nn.Module, gated: bool, transposed: bool) -> torch.Tensor:
    """The experts' stacked input projections, [E, 2I, H] (gate and up) or [E, I, H] (up alone)."""
    return _stack(experts.gate_up_proj if gated else experts.up_proj, transposed)


def _expert_activations(
    experts: nn.Module, expert: int, rows: torch.Tensor, gated: bool, transposed: bool = False
) -> torch.Tensor:
    """Expert ``expert``'s input to its down projection for ``rows``: ``act(gate) * up``, or ``act(up)``."""
    projected = F.linear(rows_for_bf16_units(rows), _input_stack(experts, gated, transposed)[expert])
    if gated:
        gate, up = projected.chunk(2, dim=-1)
        return (experts.act_fn(gate) * up)[: rows.shape[0]]
    return experts.act_fn(projected)[: rows.shape[0]]


def _no_routed_output(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """What the routed experts add to a statistics pass's output, which is thrown away: nothing."""
    return torch.zeros_like(hidden_states)


def _same(a: Any, b: tuple[torch.Tensor, ...]) -> bool:
    return (
        isinstance(a, tuple)
        and len(a) == len(b)
        and all(
            x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.dtype == y.dtype
            for x, y in zip(a, b, strict=True)
        )
    )


# ---------------------------------------------------------------------------------------------- solving


def solve(
    target: Target,
    weight: torch.Tensor,
    stats: LayerStatistics | None,
    min_tokens: int,
    fmt: QuantFormat,
    experts_per_chunk: int | None = None,
    solved: Callable[[int], None] = lambda experts: None,
) -> tuple[QuantizedWeight, list[int]]:
    """Quantize one target; returns the codes and the calibration rows each expert received.

    In an expert-parallel job each rank solves what it owns (a range of experts, or a dense target) and
    the codes are gathered, so every rank returns the whole target. ``solved`` hears of each chunk of
    experts this rank has solved."""
    scale_dtype = fmt.scale_dtype or weight.dtype
    if target.scheme.method == "rtn" or stats is None:
        return rtn_quantize(weight.float(), target.scheme, scale_dtype=scale_dtype), []
    acc = stats.accumulators.get(target.local)
    replayed = isinstance(acc, ReplayedAccumulator)
    chunk = (
        experts_per_chunk
        if experts_per_chunk is not None
        else auto_experts_per_chunk(
            weight.shape[-1], weight.shape[-2], weight.device, replayed_sums=acc.dtype if replayed else None
        )
    )
    if replayed:
        acc.experts_per_replay = chunk
    if target.kind == "dense":
        w, mine = weight.float(), None
        if acc is not None:
            hessian = acc.finalize(min_tokens)[0][0].to(w.device)
            mine = gptq_quantize(w, hessian, target.scheme, scale_dtype=scale_dtype, overwrite_hessian=True)
        return _from_owner(mine, w, target.scheme), []
    assert acc is not None
    layer_mean = _layer_mean(acc, min_tokens)
    owned = weight[stats.owned.start : stats.owned.stop]
    parts = []
    for start in range(0, owned.shape[0], chunk):  # one chunk's Hessians and weights at a time
        experts = range(start, min(start + chunk, owned.shape[0]))
        # the Hessians in their sums' memory, and the solver's factors over them: no fresh memory
        hessians, _ = acc.finalize_with(min_tokens, layer_mean, experts=experts, in_place=True)
        part = owned[experts.start : experts.stop]  # the solver takes its float32 copy an expert at a time
        parts.append(
            gptq_quantize(
                part, hessians.to(part.device), target.scheme, scale_dtype=scale_dtype, overwrite_hessian=True
            )
        )
        solved(len(experts))
        del hessians, part
    return _gathered(_concat(parts)), all_gather_cat(acc.counts).tolist()


def _layer_mean(acc: HessianAccumulator | ReplayedAccumulator, min_tokens: int) -> torch.Tensor | None:
    """The starved-expert prior ``S_all / n_all``, summed over all the layer's experts in expert order
    (across ranks, as one process would). None without rows, or when no expert is starved: then no
    expert's Hessian uses it, and a replayed stack is not summed twice for nothing."""
    counts = all_gather_cat(acc.counts)
    total = int(counts.sum())
    if total == 0 or int(counts.min()) >= max(min_tokens, 1):
        return None
    like, terms = _peeked(acc.iter_sums(upper_only=True))  # all that finalize_with reads of it
    pooled = ordered_sum(terms, like=like)
    return None if pooled is None else pooled.div_(total)


def _peeked(terms: Iterator[torch.Tensor]) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """A memoryless stand-in with the first term's shape, dtype and device, and all the terms; the first
    is not held apart from the iterator (a replayed chunk's sums are freed as soon as they are added)."""
    first = next(terms)
    return first.new_zeros(()).expand(first.shape), itertools.chain((first,), terms)


def _concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len(parts) == 1:
        return parts[0]
    g_idx = None if parts[0].g_idx is None else torch.cat([p.g_idx for p in parts])
    return replace(
        parts[0],
        codes=torch.cat([p.codes for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero=torch.cat([p.zero for p in parts]),
        g_idx=g_idx,
    )


def _gathered(qw: QuantizedWeight) -> QuantizedWeight:
    """Every rank's experts of a target, in expert order."""
    g_idx = None if qw.g_idx is None else all_gather_cat(qw.g_idx)
    return replace(
        qw,
        codes=all_gather_cat(qw.codes),
        scale=all_gather_cat(qw.scale),
        zero=all_gather_cat(qw.zero),
        g_idx=g_idx,
    )


def _from_owner(mine: QuantizedWeight | None, w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """A dense target solved by its owner, on every rank (the others contribute empty stand-ins)."""
    if not current_ranks().distributed:
        assert mine is not None
        return mine
    if mine is None:  # shapes and dtypes of the owner's result, without its work
        mine = rtn_quantize(w, scheme)
        if scheme.group_index:
            mine = replace(mine, g_idx=torch.zeros(w.shape[-1], dtype=torch.int32, device=w.device))
        empty = True
    else:
        empty = False
    fields = {"codes": mine.codes, "scale": mine.scale, "zero": mine.zero, "g_idx": mine.g_idx}
    shared = {
        name: None if t is None else all_gather_cat(t.unsqueeze(0)[: 0 if empty else 1])[0]
        for name, t in fields.items()
    }
    return replace(mine, **shared)


CPU_CHUNK_BYTES = 1 << 30  # see auto_experts_per_chunk


def auto_experts_per_chunk(
    in_features: int,
    out_features: int,
    device: torch.device,
    replayed_sums: torch.dtype | None = None,
) -> int:
    """How many experts' GPTQ problems fit in half the free memory at once (sizes as measured by
    scripts/bench_quantize.py); a layer whose experts do not all fit is finalized and solved in chunks,
    with the same result. With ``replayed_sums`` (their dtype) each chunk's running sums are formed for it,
    too, by a sweep over the kept inputs per chunk: there larger chunks save sweeps.

    On a CPU, held sums, a chunk's problems take at most ``CPU_CHUNK_BYTES``: the solver works through
    cache-sized pieces of experts whatever the chunk, so a larger one is no faster (48 of Qwen3-30B-A3B's
    gate/up experts: 6.7 s in chunks of 16, 6.6-7.4 s in one), it only holds more (6 GB for all 128)."""
    shared = solve_working_bytes(in_features, out_features, 0)
    per_expert = solve_working_bytes(in_features, out_features, 1) - shared
    budget = available_bytes(device) * 0.5
    if replayed_sums is not None:
        per_expert += replay_bytes_per_expert(in_features, replayed_sums)
    elif device.type == "cpu":
        budget = min(budget, shared + CPU_CHUNK_BYTES)
    return max(1, int((budget - shared) // per_expert))


def _dequantized(
    qw: QuantizedWeight, dtype: torch.dtype, forward_dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``qw`` decoded for a forward pass: rounded to ``dtype`` (the source's, so the next layer sees the
    weights a loader of the output sees), held in ``forward_dtype`` on ``device``, one expert at a time.

    Decoded straight into the pass's buffer, a stack is built once: not decoded in ``dtype`` on the host
    and then converted (and, on a GPU, carried to the host and back) for the pass, nor decoded whole in
    float32 first, which would be twice the stack (7.5 GB for Mixtral-8x7B's gate_up)."""
    out = torch.empty(qw.codes.shape, dtype=forward_dtype, device=device)
    if qw.codes.dim() == 2:
        return out.copy_(qw.dequantize().to(dtype))
    for expert in range(qw.codes.shape[0]):
        out[expert] = _expert(qw, expert).dequantize().to(dtype)
    return out


def _rows(qw: QuantizedWeight, rows: slice) -> QuantizedWeight:
    return replace(qw, codes=qw.codes[..., rows, :], scale=qw.scale[..., rows, :], zero=qw.zero[..., rows, :])


def _expert(qw: QuantizedWeight, expert: int) -> QuantizedWeight:
    g_idx = qw.g_idx[expert] if qw.g_idx is not None and qw.g_idx.dim() == 2 else qw.g_idx
    return replace(qw, codes=qw.codes[expert], scale=qw.scale[expert], zero=qw.zero[expert], g_idx=g_idx)


def output_modules(
    family: Family, prefix: str, target: Target, qw: QuantizedWeight, dtype: torch.dtype
) -> list[QuantizedModule]:
    """The checkpoint-named Linear modules a target becomes (one per expert and projection)."""
    if target.kind == "dense":
        return [QuantizedModule(target.aliases[0], qw, target.scheme, dtype)]
    modules = []
    projections = _stack_projections(family, target.kind)
    size = qw.codes.shape[-2] // len(projections)
    parts = [(p, _rows(qw, slice(i * size, (i + 1) * size))) for i, p in enumerate(projections)]
    for projection, stack in parts:
        for expert in range(stack.codes.shape[0]):
            name = prefix + family.original_expert_name(expert, projection)[: -len(".weight")]
            modules.append(QuantizedModule(name, _expert(stack, expert), target.scheme, dtype))
    return modules


# ------------------------------------------------------------------------------------------------ driver


class Quantizer:
    """One quantize run: holds the reader, the streamed model and the running hidden states."""

    def __init__(
        self,
        model: str,
        policy: TargetPolicy,
        options: QuantizeOptions,
        revision: str | None,
        token: str | None,
        headers_only: bool = False,
    ):
        self.model_id = model
        if headers_only:  # a dry run: plan from config + safetensors headers, download no weights
            metadata = read_metadata(model, revision, token)
            self.folder, stored = None, metadata.config
            self.reader = header_reader(metadata.tensors, stored)
        else:
            self.folder = resolve_model(model, revision, token)
            stored = read_config(self.folder)
            self.reader = open_reader(self.folder, stored)
        self.raw_config = full_precision_config(stored, "quantize")  # FP8 sources are read dequantized
        self.family = family_for(self.raw_config)
        self.config = load_config(self.raw_config)
        self.policy = replace(policy, keep=self.family.keep)
        self.options = options
        self.fmt = get_format(options.format)
        self.device = resolve_device(options.device)
        self.ranks = distributed.init(self.device)
        self.batch_count = 0  # calibration batches over all ranks
        self.progress = False  # whether to show a bar inside each layer (set by the run)
        self.groups = list(iter_groups(self.reader))
        # saved in the runtime layout (``fuse``'s or transformers' save): read from its MoE layers' stacks,
        # and it holds every layer under runtime names, its dense layers' too (Flint's sinks)
        self.source_fused = any(is_fused(names) for _, names in self.groups)
        if options.expert_statistics not in ("auto", "held", "replayed"):
            raise BadInputError(
                f"expert statistics must be auto, held or replayed, not {options.expert_statistics!r}"
            )
        self.streamed = LayerwiseModel(load_config(self.raw_config), self.device, self._forward_dtype())
        self.needs_calibration = policy.base.method == "gptq" or any(
            r.scheme is not None and r.scheme.method == "gptq" for r in policy.rules
        )

    def replays_gate_up(self, targets: list[Target], local: dict[str, torch.Tensor]) -> bool:
        """Whether this layer's gate/up statistics are replayed (``QuantizeOptions.expert_statistics``)."""
        mode = self.options.expert_statistics
        gate_up = next((t for t in targets if t.kind == "gate_up" and t.scheme.method == "gptq"), None)
        if gate_up is None or mode != "auto":
            return gate_up is not None and mode == "replayed"
        held = FIXED_BYTES + ALLOCATOR_SLACK * self._layer_peak_bytes(targets, local, replayed=False)
        return held > memory_budget_bytes(self.device)

    def _forward_dtype(self) -> torch.dtype:
        if self.options.forward_dtype == "float32":
            return torch.float32
        if self.options.forward_dtype != "checkpoint":
            raise BadInputError(
                f"forward dtype must be float32 or checkpoint, not {self.options.forward_dtype!r}"
            )
        return source_dtype(self.raw_config)

    def plan(self) -> tuple[dict[int, list[Target]], list[str]]:
        """Targets per layer and kept Linear modules, from headers alone; checks the format can hold them."""
        plan: dict[int, list[Target]] = {}
        kept: list[str] = []
        seen: list[tuple[str, ...]] = []
        widths: list[tuple[str, Scheme, int]] = []  # each target's input width, for the format
        check_layer_count((layer for layer, _ in self.groups), self.config)
        expected = held_shapes(self.streamed.model, self.config)
        if self.family.num_experts(self.config) < self.ranks.world:
            raise BadInputError(
                f"{self.ranks.world} ranks for {self.family.num_experts(self.config)} experts per layer: "
                "use at most as many ranks as experts"
            )
        for layer, names in self.groups:
            if layer is None or layer >= self.config.num_hidden_layers:
                check_shapes(self.reader.meta_tensors(names), expected)
                continue
            local, prefix = self._local(layer, self.reader.meta_tensors(names))
            check_shapes({prefix + n: t for n, t in local.items()}, expected)
            targets, layer_kept = layer_targets(
                self.family, self.streamed.backbone.layers[layer], prefix, local, self.policy
            )
            seen.extend(target.aliases for target in targets)
            seen.extend((k,) for k in layer_kept)
            plan[layer], kept = targets, kept + layer_kept
            widths.extend((t.aliases[0], t.scheme, local[t.local].shape[-1]) for t in targets)
        self._check_format(widths)
        unused = self.policy.unused_rules(seen)
        if unused:
            raise BadInputError(f"rule pattern(s) {unused} match no module of this model")
        assignment = {**dict.fromkeys(kept), **{t.aliases[0]: t.scheme for ts in plan.values() for t in ts}}
        refused = vllm_split_modules(assignment) + engine_unquantized_modules(assignment)
        if refused:
            raise BadInputError(refused[0])
        return plan, kept

    def _check_format(self, widths: list[tuple[str, Scheme, int]]) -> None:
        """The output format can store every target: refused by the first that it cannot, with a group
        size that would fit every target of its group size where there is one."""
        for name, scheme, width in widths:
            try:
                self.fmt.check(scheme, width)
            except ValueError as err:
                alike = [w for _, s, w in widths if s == scheme]  # recipes may give modules other schemes
                which = "of this model" if len(alike) == len(widths) else "with that scheme"
                fitting = fitting_group_size(scheme, alike, self.fmt)
                hint = f" (--group-size {fitting} fits every module {which})" if fitting else ""
                raise BadInputError(f"{name}: {err}{hint}") from None

    def peak_memory_bytes(self, plan: dict[int, list[Target]]) -> int:
        """What this run needs at its peak, from the headers (:mod:`moeconvert.estimate`)."""
        peak = 0
        for layer, targets in plan.items():
            local, _ = self._local(layer, self.reader.meta_tensors(dict(self.groups)[layer]))
            replayed = self.replays_gate_up(targets, local)
            peak = max(peak, self._layer_peak_bytes(targets, local, replayed=replayed))
        return FIXED_BYTES + int(ALLOCATOR_SLACK * peak)

    def memory_note(self, plan: dict[int, list[Target]]) -> str | None:
        """A warning, before any work, where the run needs more memory at its peak than the device has
        for it: the OS (or torch, on a GPU) would stop it at the widest layer, hours in on a deep model.
        Not a refusal: the estimate is within about 15% of measured peaks, and the OS may page."""
        peak, budget = self.peak_memory_bytes(plan), memory_budget_bytes(self.device)
        if peak <= budget:
            return None
        where = f"the GPU ({self.device})" if self.device.type == "cuda" else "this machine"
        return (
            f"note: the run needs about {peak / 1e9:.1f} GB of memory at its peak and {where} has "
            f"{budget / 1e9:.1f} GB for it, so it may be stopped for memory (--dry-run shows the estimate)"
        )

    def output_bytes(self, plan: dict[int, list[Target]]) -> int:
        """About what the output's shards will hold, from the headers: each target's packed codes,
        scales and zero points, every other tensor as the source stores it."""
        total = 0
        for layer, names in self.groups:
            tensors = self.reader.meta_tensors(names)
            if layer in plan:
                tensors, _ = self._local(layer, tensors)
            targets = {t.local: t for t in plan.get(layer, [])}  # none outside the decoder layers
            for name, tensor in tensors.items():
                target = targets.get(name)
                total += stored_bytes(target, tensor) if target else tensor.numel() * tensor.element_size()
        return total

    def disk_bytes(self, plan: dict[int, list[Target]]) -> int:
        """What the run's staging folder holds at its peak: the output, plus the shards in flight while it
        is assembled (:mod:`moeconvert.parts`), plus the calibration hidden states recorded at each
        layer boundary (twice, for a moment: the new record is complete before the old one goes)."""
        output = self.output_bytes(plan)
        in_flight = 2 * min(parse_size(self.options.max_shard_size), output)
        forward_bytes = torch.finfo(self._forward_dtype()).bits // 8
        return output + in_flight + 2 * self.calibration_tokens * self.config.hidden_size * forward_bytes

    @property
    def calibration_tokens(self) -> int:
        """Tokens of the whole calibration set (0 for a run without calibration)."""
        return self.options.samples * self.options.seq_len if self.needs_calibration else 0

    def activation_bytes(self) -> int:
        """This rank's calibration hidden states in the forward dtype (0 without calibration)."""
        forward_bytes = torch.finfo(self._forward_dtype()).bits // 8
        return self.calibration_tokens * self.config.hidden_size * forward_bytes // self.ranks.world

    def _layer_peak_bytes(self, targets: list[Target], local: dict[str, torch.Tensor], replayed: bool) -> int:
        forward_bytes = torch.finfo(self._forward_dtype()).bits // 8
        tokens = self.calibration_tokens
        activations = self.activation_bytes()
        reach = None if self.options.calibrate_all_experts else self.family.top_k(self.config)
        return layer_peak_bytes(
            targets,
            local,
            activation_bytes=activations,
            spilled=activations >= SPILL_BYTES,
            batch_tokens=min(self.options.batch_tokens, tokens),
            hidden_size=self.config.hidden_size,
            forward_bytes=forward_bytes,
            replayed=replayed,
            routed_rows=None if reach is None else tokens * reach,
            routed_output_readers=self.family.reads_routed_output,
        )

    def replayed_layers(self, plan: dict[int, list[Target]]) -> int:
        """How many layers' gate/up statistics would be replayed (``QuantizeOptions.expert_statistics``)."""
        groups = dict(self.groups)
        return sum(
            self.replays_gate_up(targets, self._local(layer, self.reader.meta_tensors(groups[layer]))[0])
            for layer, targets in plan.items()
        )

    def _local(self, layer: int, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        fused = runtime_layer(self.family, self.config, layer, tensors)
        prefix = layer_prefix(next(iter(tensors)))
        return {n[len(prefix) :]: t for n, t in fused.items()}, prefix

    def _original_name(self, name: str, prefix: str) -> str:
        """A runtime-layout name of the layer at ``prefix`` as the original layout has it (Mixtral's
        ``mlp.gate`` is ``block_sparse_moe.gate``): the per-expert formats write a source saved fused
        under the names its original would have, so that both give the same output."""
        return prefix + self.family.to_original_name(name[len(prefix) :])

    def _source_names(self, prefix: str, targets: list[Target], local: dict[str, torch.Tensor]) -> set[str]:
        """The checkpoint's names of the tensors that ``targets`` replace (per-expert names for a stack),
        whichever layout the source was saved in."""
        names: set[str] = set()
        for target in targets:
            names.add(prefix + target.local)
            names.add(prefix + self.family.to_original_name(target.local))  # stacks too: Granite's
            if target.kind == "dense":
                continue
            projections = _stack_projections(self.family, target.kind)
            for expert in range(local[target.local].shape[0]):
                names.update(prefix + self.family.original_expert_name(expert, p) for p in projections)
        return names

    def calibration_batches(self) -> tuple[list[torch.Tensor], str]:
        tokens = calibration_tokens(
            self.options.calib,
            self.folder,
            self.config.vocab_size,
            self.options.samples,
            self.options.seq_len,
            self.options.seed,
        )
        per_batch = max(1, self.options.batch_tokens // self.options.seq_len)
        batches = tokens.split(per_batch)
        self.batch_count = len(batches)
        if self.batch_count < self.ranks.world:
            raise BadInputError(
                f"{self.batch_count} calibration batches cannot keep {self.ranks.world} ranks busy: use more "
                "--samples or fewer ranks"
            )
        mine = [self.streamed.embed(chunk) for b, chunk in enumerate(batches) if self.ranks.owns_batch(b)]
        return mine, tokens_digest(tokens)

    def quantize_layer(
        self,
        layer: int,
        names: list[str],
        targets: list[Target],
        hidden: list[torch.Tensor],
        stored: Callable[[], list[torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], LayerReport, dict[str, Scheme]]:
        """Calibrate, solve and run one layer: its output tensors, the hidden states after it, its report
        and the schemes of its modules. ``hidden`` is updated batch by batch in place (and returned), so
        the calibration activations are held once, not twice, at every step.

        ``stored`` reads ``hidden`` back from disk (the resume record holds the layer's inputs). With it,
        activations of at least ``SPILL_BYTES`` leave memory while the layer's targets are solved, when
        memory peaks: at 128 x 2048 calibration tokens Mixtral-8x7B's are 4.3 GB in float32."""
        started = time.perf_counter()
        spill = stored is not None and sum(h.nbytes for h in hidden) >= SPILL_BYTES
        original = self.reader.get_many(names)
        local, prefix = self._local(layer, original)
        fused_layout = self.fmt.layout == "fused"
        if fused_layout:  # one stacked entry per projection, runtime names
            out = {prefix + n: t for n, t in local.items()}
        else:  # the source's own tensors, less the weights being quantized: their copy in ``local`` is enough
            replaced = self._source_names(prefix, targets, local)
            rename = self._original_name if self.source_fused else lambda name, _: name
            out = {rename(n, prefix): t for n, t in original.items() if n not in replaced}
        del original
        report = LayerReport(layer, len(targets))
        bar = progress_bar(
            total=sum(t.modules for t in targets), unit="linear", desc=f"layer {layer}", leave=False,
            show=self.progress,
        )  # fmt: skip
        with bar:
            bar.set_postfix_str("calibrating")
            stats, after_attention = self._calibrate_layer(
                layer, local, targets, hidden, keep_residual=not spill
            )
            if spill:
                hidden.clear()
            release_freed_memory()  # the pass's temporaries: the solves, where memory peaks, come next
            bar.set_postfix_str("solving")
            target_names = {t.local for t in targets}
            unquantized = {n: t for n, t in local.items() if n not in target_names}
            solved: dict[str, tuple[QuantizedWeight, torch.dtype]] = {}  # decoded for the output pass
            schemes: dict[str, Scheme] = {}
            groups = stats.solve_groups(targets, local) if stats else [[t] for t in targets]
            for group in groups:  # each source stack goes as it is solved
                solved |= self._quantize_targets(group, local, stats, prefix, report, out, schemes, bar)
            stats = local = None  # the statistics and source weights: room for the forward pass
            if spill:
                hidden.extend(stored())  # type: ignore[misc]
            bar.set_postfix_str("running")
            if hidden:  # true-sequential: the next layer sees what the quantized layer computes
                weights = unquantized | self._decoded(solved)
                with self.streamed.layer(layer, weights) as module:
                    for index, kept in enumerate(after_attention):  # in place: each batch's input goes
                        run = self.streamed.run_mlp_half if kept else self.streamed.run_layer  # as its
                        hidden[index] = run(module, hidden[index])  # output comes, not all at the end
        report.seconds = time.perf_counter() - started
        return out, hidden, report, schemes

    def _calibrate_layer(
        self,
        layer: int,
        local: dict[str, torch.Tensor],
        targets: list[Target],
        hidden: list[torch.Tensor],
        keep_residual: bool,
    ) -> tuple[LayerStatistics | None, list[bool]]:
        """The layer's GPTQ statistics (None if it has no GPTQ target or no calibration data), and which
        batches of ``hidden`` the pass left at the residual stream (see :meth:`_calibrate`)."""
        if not hidden or not any(t.scheme.method == "gptq" for t in targets):
            return None, [False] * len(hidden)
        readers = self.family.reads_routed_output
        with self.streamed.layer(layer, local, unread=LayerStatistics.unread(targets, readers)) as module:
            stats = LayerStatistics(
                module,
                targets,
                self.options.calibrate_all_experts,
                self.ranks,
                replay_gate_up=self.replays_gate_up(targets, local),
                routed_output_readers=readers,
                scaled_by=self.family.router if self.family.scales_expert_inputs else None,
                transposed=self.family.runtime_transposed,
            )
            keep = keep_residual and self.streamed.has_mlp_half(module)
            keep = (
                keep
                and self.family.block != ""
                and all(t.local.startswith(self.family.block + ".") for t in targets)
            )
            with stats.hooks():
                return stats, self._calibrate(module, hidden, stats, keep_residual=keep)

    def _quantize_targets(
        self,
        group: list[Target],
        local: dict[str, torch.Tensor],
        stats: LayerStatistics | None,
        prefix: str,
        report: LayerReport,
        out: dict[str, torch.Tensor],
        schemes: dict[str, Scheme],
        bar: tqdm,
    ) -> dict[str, tuple[QuantizedWeight, torch.dtype]]:
        """Solve one target, or as one stack of rows a group of dense ones that share a solve
        (:meth:`LayerStatistics.solve_groups`); put their output modules in ``out`` (replacing their
        source tensors) and their schemes in ``schemes``, and advance ``bar`` by their Linear modules. Returns each one's codes and
        source dtype, which :meth:`_decoded` makes the weight of the layer's output pass from.

        The source stacks are taken out of ``local``, and they and their statistics are let go once
        solved: at Qwen3-235B-A22B's width the source gate/up stack is 3.2 GB and its held sums 8.6 GB.
        Their codes (a byte per weight) wait for the output pass, not a decoded copy (two bytes in bf16,
        four in float32)."""
        first = group[0]
        weights = [local.pop(t.local) for t in group]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        per_expert = first.modules // weight.shape[0] if first.kind != "dense" else 1
        total = sum(t.modules for t in group)
        shown = 0

        def solved(experts: int) -> None:
            nonlocal shown
            bar.update(experts * per_expert)
            shown += experts * per_expert

        qw, counts = solve(
            first,
            weight.to(self.device),
            stats,
            self.options.min_tokens,
            self.fmt,
            self.options.experts_per_chunk,
            solved,
        )
        bar.update(total - shown)  # what other ranks solved, a dense target, an RTN stack
        dtype = weight.dtype
        del weight
        if stats is not None:  # these targets' statistics are spent
            for target in group:
                stats.accumulators.pop(target.local, None)
        if first.kind == "gate_up" and counts:
            report.tokens_per_expert = counts
            report.starved_experts = [e for e, c in enumerate(counts) if c < self.options.min_tokens]
        codes = {}
        start = 0
        for target, source in zip(group, weights, strict=True):
            rows = source.shape[0]
            codes[target.local] = (qw if len(group) == 1 else _rows(qw, slice(start, start + rows)), dtype)
            start += rows
            self._store(target, codes[target.local][0], dtype, prefix, out, schemes)
        return codes

    def _store(
        self,
        target: Target,
        qw: QuantizedWeight,
        dtype: torch.dtype,
        prefix: str,
        out: dict[str, torch.Tensor],
        schemes: dict[str, Scheme],
    ) -> None:
        """A solved target's output modules into ``out``, in place of its source tensors."""
        if self.fmt.layout == "fused":  # one stacked entry per projection, runtime names
            name = prefix + target.local.removesuffix(".weight")
            modules = [QuantizedModule(name, qw, target.scheme, dtype)]
        else:
            modules = output_modules(self.family, prefix, target, qw, dtype)
        for module in modules:
            out.pop(module.name, None)  # stacked experts are stored without a ".weight" suffix
            out.pop(module.name + ".weight", None)
            out.update({n: t.cpu() for n, t in self.fmt.tensors(module).items()})
            schemes[module.name] = target.scheme

    def _decoded(self, solved: dict[str, tuple[QuantizedWeight, torch.dtype]]) -> dict[str, torch.Tensor]:
        """The solved targets' weights for the output pass, decoded one at a time (each one's codes go as
        its weights come) straight into the forward dtype on the device (:func:`_dequantized`)."""
        weights = {}
        for name in list(solved):
            qw, dtype = solved.pop(name)
            weights[name] = _dequantized(qw, dtype, self.streamed.dtype, self.device)
        return weights

    def _calibrate(
        self, module: nn.Module, hidden: list[torch.Tensor], stats: LayerStatistics, keep_residual: bool
    ) -> list[bool]:
        """Run this rank's batches through the layer while the hooks gather statistics; in an
        expert-parallel job, one batch per rank at a time, each round's records shared before the next.

        With ``keep_residual`` (no target in the layer's attention, so the output pass would compute
        the very same attention again) each batch's entry of ``hidden`` is replaced by its residual
        stream after the attention, all that the output pass then needs, in place: the layer's input is
        freed as soon as it is spent. Returns which entries were replaced."""
        replaced = [False] * len(hidden)

        def run(index: int) -> None:
            captured: list[torch.Tensor | None] = []
            with (
                self.streamed.capture_residual(module, captured)
                if keep_residual
                else contextlib.nullcontext()
            ):
                self._statistics_pass(module, hidden[index], stats)
            if len(captured) == 1 and captured[0] is not None:
                hidden[index], replaced[index] = captured[0], True

        if not self.ranks.distributed:
            for index in range(len(hidden)):
                run(index)
            return replaced
        template: list[tuple[str, Any]] = []
        for round_ in range(-(-self.batch_count // self.ranks.world)):
            if round_ < len(hidden):
                run(round_)
                template = template or list(stats.records)
            stats.exchange(template)
        return replaced

    def _statistics_pass(self, module: nn.Module, batch: torch.Tensor, stats: LayerStatistics) -> None:
        """Run one batch through the layer until every statistics hook has seen it."""
        with stats.one_pass(), contextlib.suppress(StatisticsComplete):
            self.streamed.run_layer(module, batch)

    def close(self) -> None:
        self.reader.close()


def quantize(
    model: str,
    scheme: Scheme | None = None,
    *,
    output: str | Path | None = None,
    rules: tuple[Rule, ...] = (),
    options: QuantizeOptions | None = None,
    revision: str | None = None,
    token: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize MODEL's Linear weights (experts, attention, dense and shared MLPs) layer by layer.

    Routers, gates, norms, embeddings and ``lm_head`` stay in full precision unless ``rules`` say
    otherwise. ``scheme`` defaults to GPTQ, 4 bits, group 128, symmetric. The output (``output``, by default
    ``<model>-<scheme label>`` here) carries config, tokenizer, chat template and generation config.

    Raises:
        MoeConvertError: bad MODEL, unsupported family or format/scheme combination, existing output.
    """
    started = time.perf_counter()
    scheme = scheme or Scheme()
    options = options or QuantizeOptions()
    check_thresholds(options.verify_thresholds)
    policy = TargetPolicy(scheme, tuple(rules))
    runner = Quantizer(model, policy, options, revision, token, headers_only=dry_run)
    note = positions_note(options.seq_len, runner.config) if runner.needs_calibration else None
    if note and runner.ranks.writes:
        print(note, file=sys.stderr)
    try:
        plan, kept = runner.plan()
        loader_note = runner.fmt.loader_note(kept) if any(plan.values()) else None
        if loader_note and runner.ranks.writes:
            print(loader_note, file=sys.stderr)
        memory_note = runner.memory_note(plan)
        if memory_note and runner.ranks.writes:
            print(memory_note, file=sys.stderr)
        output = Path(output) if output is not None else default_output(model, scheme)
        report = QuantizeReport(
            model=model,
            output=str(output),
            scheme=asdict(scheme),
            format=options.format,
            calibration={
                "source": options.calib or "default",
                "samples": options.samples,
                "seq_len": options.seq_len,
                "seed": options.seed,
            },
            device=str(runner.device),
            quantized_modules=0,
            kept_modules=sorted({k for k in kept if not k.endswith("." + runner.family.router)}),  # routers
            # that are Linear modules (Llama 4's, Gemma 4's) are kept as routers, not by the rules
            layers=[],
            source=describe_source(model, runner.folder, revision),
            sizes={"source_bytes": runner.reader.total_bytes},
            versions=library_versions(),
        )
        if dry_run:
            report.quantized_modules = sum(t.modules for targets in plan.values() for t in targets)
            report.sizes["peak_memory_bytes"] = runner.peak_memory_bytes(plan)
            report.sizes["output_bytes"] = runner.output_bytes(plan)
            report.sizes["disk_bytes"] = runner.disk_bytes(plan)
            report.sizes["activation_bytes"] = runner.activation_bytes()
            report.sizes["replayed_layers"] = runner.replayed_layers(plan)
            return report
        with _resumable_stops(Path(output)):
            _run(runner, plan, report, Path(output), force, progress, run_settings(runner, report, rules))
    finally:
        runner.close()
    if verify and distributed.current().writes:  # one rank checks the finished output
        try:
            report.verify = _verify_output(model, Path(output), options, revision, token, progress)
        except KeyboardInterrupt:
            raise InterruptedRunError(
                f"interrupted during the parity check; {output} is complete but not verified: "
                f"check it with `moeconvert verify {model} {output} --store`"
            ) from None
    report.seconds = time.perf_counter() - started
    return report


def _verify_output(
    model: str,
    output: Path,
    options: QuantizeOptions,
    revision: str | None,
    token: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Parity of the fresh output against its source, stored beside it (the model card quotes it)."""
    from .verify import verify

    parity = verify(
        model, str(output), device=options.device, calib=options.calib, seed=options.seed + 1,
        samples=8, seq_len=min(options.seq_len, 512), revision=revision, token=token, progress=progress,
        store=True, **options.verify_thresholds,
    )  # fmt: skip
    return parity.to_dict()


def run_settings(runner: Quantizer, report: QuantizeReport, rules: tuple[Rule, ...]) -> dict[str, Any]:
    """Everything that decides the output bytes: a partial output resumes only under the same settings
    (``experts_per_chunk`` and ``expert_statistics`` are left out: they give identical bytes; so are
    verify thresholds)."""
    options = {
        k: v
        for k, v in asdict(runner.options).items()
        if k not in ("experts_per_chunk", "expert_statistics", "verify_thresholds", "device")
    }
    return {
        "source": report.source,
        "source_files": _file_stamps(runner.folder),
        "scheme": report.scheme,
        "rules": [asdict(rule) for rule in rules],
        "options": options,
        "device": runner.device.type,
        "versions": report.versions,
    }


def _file_stamps(folder: Path | None) -> dict[str, list[int]]:
    """Size and modification time of the source's weights and config: a partial output made from other
    files (a folder rewritten in place) is not resumed."""
    if folder is None:
        return {}
    paths = [*sorted(folder.glob("*.safetensors")), folder / "config.json"]
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.exists()}


@contextlib.contextmanager
def _resumable_stops(output: Path) -> Iterator[None]:
    """Ctrl-C and failed writes stop a run with one line that says the finished layers are kept."""
    kept = f"the finished layers are kept in {output.with_name(f'.{output.name}.partial')}"
    try:
        yield
    except KeyboardInterrupt:
        raise InterruptedRunError(f"interrupted; {kept}: run the same command again to resume") from None
    except OSError as err:
        raise OutputWriteError(
            f"cannot write the output ({err.strerror or err}); {kept}: free space or fix the cause, then run "
            "the same command again to resume"
        ) from None


def _run(
    runner: Quantizer,
    plan: dict[int, list[Target]],
    report: QuantizeReport,
    output: Path,
    force: bool,
    progress: bool,
    settings: dict[str, Any],
) -> None:
    ranks = runner.ranks
    runner.progress = progress and ranks.writes
    needs = runner.disk_bytes(plan) if ranks.writes else 0
    folder = OutputFolder(output, force=force, resumable=True, source=runner.folder, needs_bytes=needs)
    state = RunState(folder.staging, settings, ranks)
    if ranks.writes:
        folder.check_apart()
        folder.lock()  # before a partial output is read, resumed or deleted: another run may be writing it
        try:
            state.check(output, force)
        except BaseException:
            folder.unlock()
            raise
    with folder if ranks.writes else contextlib.nullcontext(folder.staging) as staging:
        barrier()  # the staging folder exists before any rank reads or writes its records
        done = state.start()
        if done.groups_done and ranks.writes:
            print(
                f"resuming {staging}: {done.groups_done} of {len(runner.groups)} layers already done",
                file=sys.stderr,
            )
        parts = PartsWriter(staging) if ranks.writes else None
        hidden, top = _starting_state(runner, report, state, done)
        report.layers = [LayerReport(**d) for d in done.layers]
        all_schemes = {name: Scheme(**fields) for name, fields in done.schemes.items()}
        desc = f"quantize {report.scheme['bits']}-bit"
        with (
            progress_bar(
                total=len(runner.groups),
                initial=done.groups_done,
                unit="layer",
                desc=desc,
                show=progress and ranks.writes,
            ) as bar,
            ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetcher,
        ):
            for index, (layer, names) in enumerate(runner.groups):
                if index < done.groups_done:
                    continue
                if index + 1 < len(runner.groups):  # the next layer comes off disk while this one computes
                    prefetcher.submit(runner.reader.prefetch, runner.groups[index + 1][1])
                if layer is None or layer >= runner.config.num_hidden_layers:
                    tensors = top if layer is None else runner.reader.get_many(names)  # MTP layers: carried
                else:
                    tensors, hidden, layer_report, schemes = runner.quantize_layer(
                        layer, names, plan[layer], hidden, stored=_recorded_hidden(state, runner.device)
                    )
                    report.layers.append(layer_report)
                    all_schemes.update(schemes)
                if parts is not None:
                    parts.write(index, tensors)
                done.groups_done, done.layers = index + 1, [asdict(r) for r in report.layers]
                done.schemes = {name: asdict(scheme) for name, scheme in all_schemes.items()}
                hidden = state.record(done, hidden)  # on a CPU: mapped from the record
                del tensors
                release_freed_memory()
                pause_for_tests(str(index), f"group {index}")
                bar.update(1)
        if parts is None:
            return
        digests = parts.assemble(parse_size(runner.options.max_shard_size), show_progress=runner.progress)
        report.quantized_modules = len(all_schemes)
        report.sizes["output_bytes"] = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        _write_configs(runner, staging, all_schemes, report.kept_modules)
        (staging / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        write_card(staging, output.name)
        state.discard()
        write_manifest(staging, digests)


def _recorded_hidden(state: RunState, device: torch.device) -> Callable[[], list[torch.Tensor]] | None:
    """What reads back the hidden states recorded at the last group boundary, if there is a record."""
    return (lambda: state.hidden(device)) if state.hidden_path.exists() else None


def _starting_state(
    runner: Quantizer, report: QuantizeReport, state: RunState, done: Progress
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Calibration hidden states (this rank's batches) and the top-level tensors for a fresh run; for a
    resumed one, the hidden states stored at the last finished layer (the top tensors are written then)."""
    if done.groups_done:
        report.calibration["tokens_sha256"] = done.tokens_sha256
        runner.batch_count = done.batch_count
        return state.hidden(runner.device), {}
    top = runner.reader.get_many(dict(runner.groups).get(None, []))
    if not runner.needs_calibration:
        return [], top
    runner.streamed.load_top(top)
    hidden, digest = runner.calibration_batches()
    runner.streamed.release_top()
    report.calibration["tokens_sha256"] = done.tokens_sha256 = digest
    done.batch_count = runner.batch_count
    return hidden, top


def _write_configs(runner: Quantizer, staging: Path, schemes: dict[str, Scheme], kept: list[str]) -> None:
    for path in side_files(runner.folder):
        shutil.copyfile(path, staging / path.name)
    heads = {n.removesuffix(".weight") for n in runner.reader.metas if text_model_name(n) == "lm_head.weight"}
    ignored = sorted(set(kept) | {"lm_head"} | heads | _router_names(runner) | _tower_modules(runner))
    names = [name for _, group in runner.groups for name in group]
    quant_config = runner.fmt.config(schemes, ignored, carried_rules(names, runner.config.num_hidden_layers))
    config = dict(sorted({**runner.raw_config, "quantization_config": quant_config}.items()))
    # not sort_keys: loaders apply GPTQ's "dynamic" rules in their order, the first match deciding
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in runner.fmt.extra_files(quant_config).items():
        (staging / name).write_text(text)


def _tower_modules(runner: Quantizer) -> set[str]:
    """The matrices of encoders beside the text model (a vision-language checkpoint's ``model.visual``),
    carried in full precision: named one by one, as loaders map module names, not regexes, onto their
    own (vLLM's Qwen3.5 calls them ``visual.*``)."""
    return {
        name.removesuffix(".weight")
        for name, meta in runner.reader.metas.items()
        if is_tower(name) and name.endswith(".weight") and len(meta.shape) == 2
    }


def _router_names(runner: Quantizer) -> set[str]:
    """Router modules under both checkpoint and runtime names (vLLM builds them as Linear layers under
    checkpoint names; transformers matches runtime names, e.g. Phi-MoE's ``mlp.router``)."""
    names = set()
    router = re.compile(
        r"(?:(?:block_sparse_moe|mlp|feed_forward|mixer)\.(?:gate|gate\.wg|router|router\.gate|router\.layer|shared_expert_gate)"
        r"|router\.proj)\.weight"  # Gemma 4's router hangs off the decoder layer
    )
    for name in runner.reader.metas:
        layer = LAYER_RE.match(name)
        if layer and router.fullmatch(name, layer.end()):
            prefix, weight = layer.group(0), name[layer.end() :]  # the checkpoint's, in either layout
            for local in (
                weight,
                runner.family.to_fused_name(weight),
                runner.family.to_original_name(weight),
            ):
                names.add(prefix + local[: -len(".weight")])
    return names
