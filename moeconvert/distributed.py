"""Expert-parallel quantization over ``torch.distributed``: who does what, and the few collectives it needs.

Launched with ``torchrun`` (or ``--distributed``, which reads the same ``RANK``/``WORLD_SIZE``/``MASTER_*``
variables), every rank runs the same layer-by-layer pipeline, split three ways:

- **Calibration batches** go round-robin: rank ``r`` forwards batches ``r, r + N, r + 2N, ...``.
- **Experts** of each MoE layer are split into contiguous ranges, one per rank; **dense targets**
  (attention, shared experts, dense MLPs) go round-robin by their order in the layer. Each rank gathers
  statistics for and solves only what it owns, so the Hessians (the largest buffers) are split.
- After each round of batches, the inputs the hooks captured are exchanged (:func:`all_gather_cat`), and
  each owner adds the rows of every batch **in batch order**: its experts see exactly the row sequence a
  single process would give them, and :class:`~moeconvert.quant.hessian.HessianAccumulator` sums a given
  row sequence bit-identically however it arrives. The layer-wide prior for starved experts is summed in
  expert order by passing the running sum from rank to rank (:func:`ordered_sum`), never by an all-reduce
  of unspecified order. Solved codes are gathered to every rank (the next layer's forward needs them);
  rank 0 writes the output.

On CPU with gloo the output is therefore byte-identical to a single-process run; see docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import BadInputError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes the output (the staging folder must be on a filesystem all ranks see)."""
        return self.rank == 0

    def owns_batch(self, batch: int) -> bool:
        return batch % self.world == self.rank

    def experts(self, count: int) -> range:
        """This rank's contiguous share of ``count`` experts (the first ``count % N`` ranks get one more)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def owns_target(self, index: int) -> bool:
        """Dense targets of a layer, in order, go round-robin."""
        return index % self.world == self.rank


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_gpus(device: torch.device, ranks: int) -> None:
    """One GPU per rank on CUDA: refuse a job of more ranks on this machine than it has GPUs, before any
    rank starts (past the last GPU a rank would die in torch on an 'invalid device ordinal')."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else ranks
    if ranks > gpus:
        raise BadInputError(
            f"{ranks} ranks on CUDA need {ranks} GPUs (one each), but torch sees {gpus}; "
            "pass --device cpu to run the ranks on the CPU (gloo), or fewer ranks"
        )


def init(device: torch.device) -> Ranks:
    """Join the job described by torchrun's environment: gloo on CPU, NCCL on CUDA (one GPU per rank,
    ``LOCAL_RANK``). A no-op when not launched with several processes."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current()
    if device.type == "cuda":
        check_gpus(device, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return current()


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def all_gather_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor``, in rank order. First dims may differ (0 too); trailing shape and dtype
    must agree. ``[tensor]`` outside a distributed job."""
    ranks = current()
    if not ranks.distributed:
        return [tensor]
    wire = (tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor).contiguous()  # gloo: no bool
    sizes = [torch.zeros(1, dtype=torch.int64, device=wire.device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([wire.shape[0]], dtype=torch.int64, device=wire.device))
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *wire.shape[1:]), dtype=wire.dtype, device=wire.device)
    padded[: wire.shape[0]] = wire
    gathered = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(gathered, padded)
    pieces = [g[:n] for g, n in zip(gathered, counts, strict=True)]
    return [p.view(torch.bool) for p in pieces] if tensor.dtype == torch.bool else pieces


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order."""
    pieces = all_gather_list(tensor)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def ordered_sum(terms: Iterable[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """``((t0 + t1) + t2) + ...`` over every rank's ``terms`` in rank order, then list order: exactly the
    order one process would add them in. The running sum travels from rank to rank; the last rank's
    result is broadcast. ``like`` gives shape, dtype and device. None if no rank has a term."""
    ranks = current()
    running: torch.Tensor | None = None
    if ranks.rank > 0:
        received = torch.empty((1 + like.numel(),), dtype=like.dtype, device=like.device)
        dist.recv(received, src=ranks.rank - 1)
        running = received[1:].view(like.shape).clone() if received[0] else None
    for term in terms:
        running = term.clone() if running is None else running.add_(term)
    if not ranks.distributed:
        return running
    message = torch.zeros((1 + like.numel(),), dtype=like.dtype, device=like.device)
    if running is not None:
        message[0], message[1:] = 1, running.reshape(-1)
    if ranks.rank < ranks.world - 1:
        dist.send(message, dst=ranks.rank + 1)
    dist.broadcast(message, src=ranks.world - 1)
    return message[1:].view(like.shape).clone() if message[0] else None
