"""Benchmark GPTQ on one MoE layer's experts at real widths: Hessians, solve, pack, write, peak memory.

Random bf16 expert weights in the fused layout (``gate_up [E, 2I, H]``, ``down [E, H, I]``) and random
calibration hidden states routed by a random top-k router go through the same steps the quantize
pipeline takes for one layer, each timed on its own:

* Hessians: ``gate_up`` statistics of the routed tokens, the per-expert ``act(gate) * up`` forward that
  ``down`` sees, ``down`` statistics, and ``finalize`` (normalization and the starved-expert prior). The
  forward runs, and the rows reach the accumulator, as the pipeline's ``--forward-dtype`` has them:
  widened to float32 (``float32``, its default) or in bf16 (``checkpoint``), which a CPU with bf16 units
  multiplies there;
* solve: :func:`gptq_quantize` of the whole stack (the bf16 weights, which it widens to float32 an
  expert at a time as it transposes them, and bf16 scales, as the pipeline does), split into its
  factorization and its column loop, against the baseline measured in the same run, a Python loop
  calling it on one expert at a time;
* pack: :func:`pack_compressed`, the compressed-tensors layout;
* write: the packed stack to a safetensors file, fsynced (``--write-dir``; the pipeline's writer also
  hashes, in a thread beside the writes).

Every phase is reported with a FLOP count and as a fraction of this machine's own float32 matmul rate,
measured in the same process, so a slow phase reads as "far from what the hardware does on a GEMM"
rather than as a bare number. That rate is read at the start, before every timed layer and at the end,
and the best reading is the reference: on a shared VM a single reading can fall in a slow spell of the
host and flatter every phase. Each preset runs in a fresh subprocess so that its peak RSS (VmHWM) is its
own. The timed layer is the second that process runs (``--warm-up-layers``, default 1): the first, on
the same inputs, pays for the process's first touches of GBs of fresh memory, which on the VM guests
of docs/PERFORMANCE.md cost the Hessian products four to six times their own time, and a model's other
dozens of layers do not; its Hessian and solve times are printed below the table, and kept in the JSON.
With ``--timed-layers N`` the layer is timed N times and every phase reads the median of its N times
(each one kept in the JSON): on a shared VM one layer's phase can be slowed by the host, the median of
three much less often. The loop baseline runs in the last of them only.
Calibration hidden states are ``(z @ A) * s`` (correlated features, a few loud channels), not a real
model's, so the Hessians are realistic in size and conditioning but not in content.

Every phase also records how many cores other processes kept busy meanwhile (from ``/proc/stat``), and
its CPU time beside its wall time: on a busy machine the wall time includes the time this thread waited
for a core, the CPU time does not (it still includes sharing caches and memory bandwidth), so each rate
is also given against the matmul's own CPU-time rate.
On a small shared machine pass ``--threads`` to leave their cores free: torch's OpenMP threads spin at
each barrier, and one of them descheduled by a foreign process stalls every parallel op, which made
the solve several times slower than a single thread on the 2-core machine of docs/PERFORMANCE.md.

    python scripts/bench_quantize.py --preset all --threads 1 --loop-experts 16

With ``--count-operators`` both solves run once more, untimed, on copies of their inputs taken before
the timed runs, counting the ATen operators they issue (views included); the run also measures what
issuing one small operator costs here. The share of each timed solve that is Python and dispatch, not
arithmetic, is estimated as operators x cost per operator over the solve's time. The issue's proxy for
that share on a CPU, "the per-expert loop >= 3x slower than the batched solve", also moves with how
much arithmetic each expert has; this is the share itself. The copies raise such a run's peak RSS.

With ``--device cuda`` the same steps run on the GPU: inputs are drawn there, every phase starts and ends
with a synchronize, the reference rate is the GPU's own float32 matmul (TF32 off, as the pipeline leaves
it), peak GPU memory is reported beside the host's RSS, and the default calibration is the full
``128 x 2048`` tokens. The summary's ``layer s`` (every phase but the loop baseline) is what the issue's
CUDA goal, a Qwen3-30B-A3B layer in 12 s, is measured by.

    python scripts/bench_quantize.py --device cuda --preset all --loop-experts 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GROUP_ALIGN = 128  # scaled widths stay multiples of the usual group size
FULL_CALIBRATION_TOKENS = 128 * 2048  # the pipeline's default samples x seq_len; the default on a GPU
LAYER_PHASES = ("hessian", "forward", "solve", "pack", "write")  # the batched solve only: see summarize
BUSY = 0.25  # cores other processes took beyond those this run leaves free: flag the phase's timing


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int  # per-expert (moe) intermediate size
    experts: int
    top_k: int
    tokens: int  # default calibration tokens on a CPU: about 1,000 routed rows per expert


# Routed experts only: DeepSeek-V2-Lite's 2 shared experts are dense Linears, not part of this stack.
# A sixteenth to a sixty-fourth of the full calibration, so that a 2-core CPU runs a layer in under a
# minute, but enough that every expert gets its own statistics: with 2,048 tokens almost half of
# Qwen3-30B-A3B's experts fall below ``min_tokens`` (the starved-expert prior), and each expert's
# Hessian is one product of about 128 rows, timed by its first touch of fresh memory, not its flops.
PRESETS = {
    "mixtral": Preset(hidden=4096, intermediate=14336, experts=8, top_k=2, tokens=4096),
    "qwen3-30b-a3b": Preset(hidden=2048, intermediate=768, experts=128, top_k=8, tokens=16384),
    "deepseek-v2-lite": Preset(hidden=2048, intermediate=1408, experts=64, top_k=6, tokens=16384),
}


# ------------------------------------------------------------------------------------------ cost model


def solve_flops(out: int, inp: int, block: int = 128) -> dict[str, float]:
    """FLOPs the solver executes on one expert ``[out, in]``, split as it spends them.

    * ``prepare``: one Cholesky of the (reversed) Hessian, ``in^3 / 3``, and per block of ``B`` columns
      the inverse of its diagonal block and its product with the rows before it, ``B * in^2`` in all.
      (The reference's Cholesky, ``cholesky_inverse`` and second Cholesky were ``4/3 in^3``; this solver
      needs none of the inverse, see :mod:`moeconvert.quant.gptq`.)
    * ``columns``: error feedback. Column ``i`` feeds the ``in - i - 1`` columns after it in every row,
      one multiply and one add each, ``out * in^2`` in total: a fraction ``B / in`` inside blocks
      (rank-1 updates of a few columns, then small matmuls) and the rest one matmul per block.
    Quantizing the columns themselves (round, clamp, scales) is O(out * in) and left out.
    """
    return {"prepare": inp**3 / 3 + block * inp**2, "columns": float(out) * inp**2}


def hessian_flops(rows: int, inp: int) -> float:
    """FLOPs of the Hessian products over ``rows`` rows of width ``inp``, as the accumulator executes them:
    only the upper block triangle of ``x^T x``, one matmul per band of ``SYMMETRIZE_TILE`` rows from its
    diagonal block on (:mod:`moeconvert.quant.hessian`, "Half the products"); ``2 * rows * inp^2`` for
    the whole product."""
    from moeconvert.quant.hessian import SYMMETRIZE_TILE

    bands = range(0, inp, SYMMETRIZE_TILE)
    return sum(2.0 * rows * min(SYMMETRIZE_TILE, inp - start) * (inp - start) for start in bands)


def preset_cost(p: Preset, tokens: int, chunk: int | None = None) -> dict[str, float]:
    """FLOPs of every phase and the bytes the pipeline holds at its peak, for one layer.

    ``chunk`` is ``--max-experts-per-chunk``: it bounds only the solver's working set, not the
    accumulators' float32 sums, in which the Hessians are finalized, which are per layer.
    """
    rows = tokens * p.top_k  # routed (token, expert) pairs; each is one row for gate_up and for down
    h, i, e = p.hidden, p.intermediate, p.experts
    gate_up, down = solve_flops(2 * i, h), solve_flops(h, i)
    weights_bf16 = e * 3 * i * h * 2
    sums = e * (h * h + i * i) * 4  # both accumulators live until the layer is done, as in the pipeline

    def solve_bytes(out: int, inp: int) -> int:
        # Twice the float32 weights, one H-sized float32 buffer per expert in a chunk, and the codes. The
        # solver's transposed float32 copy is the only float32 one now (the bf16 weights go in), and the
        # factor is written over the Hessians (in the sums), so two terms err high; they are kept so that
        # '--width-scale auto' picks what it picked before.
        return 2 * e * out * inp * 4 + min(chunk or e, e) * inp * inp * 4 + e * out * inp

    return {
        "hessian": hessian_flops(rows, h) + hessian_flops(rows, i),
        "forward": 2.0 * rows * h * 2 * i,
        "solve": e * (sum(gate_up.values()) + sum(down.values())),
        "peak_bytes": weights_bf16 + sums + max(solve_bytes(2 * i, h), solve_bytes(h, i)),
    }


def scaled(p: Preset, scale: float) -> Preset:
    """The preset with hidden and intermediate widths scaled, kept multiples of 128."""

    def width(n: int) -> int:
        return max(GROUP_ALIGN, round(n * scale / GROUP_ALIGN) * GROUP_ALIGN)

    return Preset(width(p.hidden), width(p.intermediate), p.experts, p.top_k, p.tokens)


# ------------------------------------------------------------------------------------ machine probes


def vm_hwm() -> int:
    """Peak resident set of this process in bytes (VmHWM; a fresh exec starts it afresh)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _busy_jiffies() -> int:
    """CPU time every process on the machine used (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


class CpuWatch:
    """How many cores something other than this process kept busy over an interval.

    ``/proc/stat`` counts the whole machine (other containers on a shared VM included) and the process's
    own CPU time is subtracted, so a phase that ran alongside someone else's job shows it. Timings on a
    small shared machine are only comparable when this stays near 0.
    """

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK")
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        own = os.times()
        return time.perf_counter(), _busy_jiffies() / self._hz, own.user + own.system

    def other_cores(self) -> float:
        wall0, busy0, own0 = self._start
        wall1, busy1, own1 = self._sample()
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9))


def synchronize(device: Any) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it (nothing to wait for on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(device: Any) -> int:
    """The GEMM side whose rate stands for the machine: 2048 on CPU, 8192 on a GPU (2048 would be
    launch- and tail-bound there)."""
    import torch

    return 8192 if torch.device(device).type == "cuda" else 2048


def matmul_gflops(device: Any = "cpu", repeats: int = 5) -> tuple[float, float]:
    """Best-of float32 ``n^3`` GEMM rate on ``device``, by wall time and by CPU time: the ceilings the
    GEMM-shaped phases are compared against."""
    import torch

    n = matmul_size(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    synchronize(device)
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        a @ b
        synchronize(device)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return 2 * n**3 / best_wall / 1e9, 2 * n**3 / max(best_cpu, 1e-9) / 1e9


def stream_gbs(device: Any = "cpu", elements: int = 1 << 26, repeats: int = 3) -> float:
    """Best-of ``a += b`` bandwidth (read a, read b, write a): the ceiling of the elementwise work."""
    import torch

    a, b = torch.randn(elements, device=device), torch.randn(elements, device=device)
    a += b
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a += b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 3 * elements * 4 / best / 1e9


def operator_counter() -> Any:
    """A dispatch mode that counts the ATen operators run inside it (``.count``): every operator the
    solver issues, a view as much as a matmul, each one a trip through Python and torch's dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OperatorCount(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.count += 1
            return func(*args, **(kwargs or {}))

    return OperatorCount()


def operator_seconds(device: Any = "cpu", steps: int = 20_000, repeats: int = 3) -> float:
    """Best-of seconds per operator of a Python loop shaped like the solver's per-column steps (index a
    column of two stacks, update one in place) on tensors too small to compute anything: Python, the
    views, argument parsing, dispatch, and on a GPU the launch."""
    import torch

    x, y = torch.zeros(2, 16, 1, device=device), torch.ones(2, 16, 1, device=device)

    def step(i: int) -> None:
        x[:, i % 16].sub_(y[:, i % 16])

    with operator_counter() as counter:
        step(0)
    per_step = counter.count  # two column views and the update
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) / (steps * per_step)


# --------------------------------------------------------------------------------------------- worker


def device_peak_bytes(device: Any) -> int | None:
    """Peak GPU memory torch has allocated in this process so far (None on CPU)."""
    import torch

    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


class Recorder:
    """Phase rows: wall and CPU seconds, FLOPs, other processes' load, and the peak RSS (and GPU
    memory) once the phase is done. Each phase is bracketed by synchronizes, so on a GPU its wall time
    is its kernels' and not only their launches'."""

    def __init__(self, device: Any = "cpu") -> None:
        self.rows: list[dict[str, Any]] = []
        self.device = device

    @contextmanager
    def phase(self, phase: str, target: str, flops: float | None = None) -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {"phase": phase, "target": target, "flops": flops}
        synchronize(self.device)
        watch, start, cpu = CpuWatch(), time.perf_counter(), time.process_time()
        yield row
        synchronize(self.device)
        row["seconds"] = time.perf_counter() - start
        row["cpu_seconds"] = time.process_time() - cpu
        row["other_cores"] = watch.other_cores()
        row["peak_rss_bytes"] = vm_hwm()
        row["peak_device_bytes"] = device_peak_bytes(self.device)
        self.rows.append(row)
        print(f"  {phase:<30}{target:<9}{row['seconds']:>9.2f} s", file=sys.stderr, flush=True)


@contextmanager
def timed_solver_parts(totals: dict[str, list[float]], device: Any = "cpu") -> Iterator[bool]:
    """Split the solve into Hessian preparation and the column loop by timing two solver internals.

    The solver is one call; wrapping its two stages in place (and restoring them) splits its time
    without running anything twice (on a GPU each part is bracketed by synchronizes, which costs the
    overlap of one part's tail with the next one's launches). ``totals[part]`` gets ``[wall seconds, CPU
    seconds]``. Yields False, and splits nothing, if the internals were renamed.
    """
    from moeconvert.quant import gptq

    names = {"_feedback_factor": "prepare", "_solve": "columns"}
    originals = {name: getattr(gptq, name, None) for name in names}
    if any(fn is None for fn in originals.values()):
        yield False
        return

    def wrap(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(device)
                spent = totals.setdefault(part, [0.0, 0.0])
                spent[0] += time.perf_counter() - start
                spent[1] += time.process_time() - cpu

        return timed

    for name, part in names.items():
        setattr(gptq, name, wrap(part, originals[name]))
    try:
        yield True
    finally:
        for name, fn in originals.items():
            setattr(gptq, name, fn)


def flush_buffered_rows(acc: Any) -> None:
    """Turn the rows an accumulator still buffers into products now, so they count as accumulation.

    The accumulator multiplies rows in fixed chunks (512 rows by default) and leaves each expert's
    partial last chunk for ``finalize``; with a few hundred rows per expert that is all of them, and
    without this the ``x x^T`` work would be timed as part of ``finalize``. Its internal flush is the
    same call ``finalize`` makes first, so the total is unchanged; if it was renamed nothing is moved.
    """
    flush = getattr(acc, "_flush_all", None)
    if flush is not None:
        flush()


def write_packed(tensors: dict[str, Any], path: Path) -> int:
    """Write tensors to a safetensors file and fsync it (then delete it); returns the bytes on disk."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # from a GPU the tensors come to the host first, as the pipeline's writer takes them
        save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        return path.stat().st_size
    finally:
        path.unlink(missing_ok=True)


def calibration(p: Preset, tokens: int, seed: int, device: Any = "cpu") -> tuple[Any, Any]:
    """bf16 hidden states ``(z @ A) * s`` and the top-k expert indices of a random softmax router, drawn
    on ``device`` (its own generator: a GPU draws other numbers than the CPU from the same seed)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, device=device)

    mixing = randn(p.hidden, p.hidden) / math.sqrt(p.hidden)
    loud = torch.exp(0.5 * randn(p.hidden))  # some channels much larger than others
    x = (randn(tokens, p.hidden) @ mixing) * loud
    router = randn(p.hidden, p.experts) / math.sqrt(p.hidden)
    probs = torch.softmax(x @ router, dim=-1)
    index = probs.topk(p.top_k, dim=-1).indices
    return x.to(torch.bfloat16), index


def expert_weights(p: Preset, seed: int, device: Any = "cpu") -> tuple[Any, Any]:
    """bf16 ``gate_up [E, 2I, H]`` and ``down [E, H, I]``, drawn one expert at a time to cap the float32 spike."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed + 1)
    gate_up = torch.empty(p.experts, 2 * p.intermediate, p.hidden, dtype=torch.bfloat16, device=device)
    down = torch.empty(p.experts, p.hidden, p.intermediate, dtype=torch.bfloat16, device=device)
    for e in range(p.experts):
        gate_up[e] = torch.randn(2 * p.intermediate, p.hidden, generator=gen, device=device) * 0.02
        down[e] = torch.randn(p.hidden, p.intermediate, generator=gen, device=device) * 0.02
    return gate_up, down


def run_preset(cfg: dict[str, Any]) -> dict[str, Any]:
    """One layer, start to end, in this (fresh) process; returns everything the report needs.

    ``warm_up_layers`` layers run first on the same inputs, untimed in the table (their phases are
    kept in the JSON): a process's first pass over GBs of fresh memory costs more than any later
    layer's, on the benchmark's VM guests four to six times the Hessian products' own time, and a model
    has dozens of layers, so the timed layer is one as the pipeline runs after its first."""
    import torch

    from moeconvert.quant.hessian import CHUNK_ROWS
    from moeconvert.quant.scheme import Scheme

    p = Preset(**cfg["preset"])
    tokens = cfg["tokens"]
    scheme = Scheme(bits=cfg["bits"], group_size=cfg["group_size"])
    device = torch.device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    rss_imports = vm_hwm()
    matmul_start, stream = matmul_gflops(device), stream_gbs(device)
    operator_cost = operator_seconds(device) if cfg.get("count_operators") else None

    x, index = calibration(p, tokens, cfg["seed"], device)
    gate_up_w, down_w = expert_weights(p, cfg["seed"], device)
    rss_inputs = vm_hwm()
    print(f"{cfg['name']}: H {p.hidden}, I {p.intermediate}, E {p.experts}, {tokens} tokens", file=sys.stderr)
    chunk_rows = cfg.get("hessian_chunk_rows") or CHUNK_ROWS
    mask = torch.zeros(tokens, p.experts, dtype=torch.bool, device=device).scatter_(1, index, True)
    counts = mask.sum(0)
    rows = int(counts.sum())
    warm_ups = []
    for layer in range(cfg.get("warm_up_layers", 0)):
        print(f"  warm-up layer {layer + 1} (not in the table)", file=sys.stderr)
        warm_up = Recorder(device)
        run_layer(cfg, p, scheme, x, mask, gate_up_w, down_w, warm_up)
        warm_ups.append(warm_up.rows)
    timed = cfg.get("timed_layers", 1)
    repeats, probes = [], [matmul_start]
    for layer in range(timed - 1):
        print(f"  timed layer {layer + 1} of {timed}", file=sys.stderr)
        probes.append(matmul_gflops(device))  # one more reading of the machine's rate per layer
        repeat = Recorder(device)
        run_layer(cfg, p, scheme, x, mask, gate_up_w, down_w, repeat)
        repeats.append(repeat.rows)
    if timed > 1:
        print(f"  timed layer {timed} of {timed}, with the loop baseline", file=sys.stderr)
    probes.append(matmul_gflops(device))
    rec = Recorder(device)
    summary = run_layer(
        cfg, p, scheme, x, mask, gate_up_w, down_w, rec, baseline=True, operator_cost=operator_cost
    )
    take_medians(rec.rows, repeats, summary)

    matmul_end = matmul_gflops(device)
    probes.append(matmul_end)
    # the machine's rate: the best reading, since a probe caught in one of these guests' slow spells
    # would flatter every phase (126 GFLOP/s read at the start of a run whose phases ran as fast as in
    # runs that read 180)
    reference = max(rate for rate, _ in probes)
    reference_cpu = max(rate for _, rate in probes)
    for row in [*rec.rows, *(row for rows_ in warm_ups for row in rows_)]:
        flops = row.get("flops")
        row["gflops"] = flops / row["seconds"] / 1e9 if flops and row["seconds"] > 0 else None
        row["of_matmul"] = row["gflops"] / reference if row["gflops"] else None
        cpu_rate = flops / row["cpu_seconds"] / 1e9 if flops and row["cpu_seconds"] > 0 else None
        row["of_matmul_cpu"] = cpu_rate / reference_cpu if cpu_rate else None
    return {
        "name": cfg["name"],
        "preset": asdict(p),
        "full_width_preset": cfg["full_preset"],
        "width_scale": cfg["width_scale"],
        "tokens": tokens,
        "routed_rows": rows,
        "rows_per_expert": {
            "min": int(counts.min()),
            "median": statistics.median(counts.tolist()),
            "max": int(counts.max()),
            "below_min_tokens": int((counts < cfg["min_tokens"]).sum()),
        },
        "min_tokens": cfg["min_tokens"],
        "scheme": scheme.label,
        "max_experts_per_chunk": cfg["max_experts_per_chunk"],
        "hessian_chunk_rows": chunk_rows,
        "hessian_rows_dtype": "bfloat16" if cfg.get("forward_dtype") == "checkpoint" else "float32",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "matmul_size": matmul_size(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "matmul_gflops_start": matmul_start[0],
        "matmul_gflops_end": matmul_end[0],
        "matmul_gflops_probes": [rate for rate, _ in probes],
        "matmul_gflops_reference": reference,
        "matmul_cpu_gflops_start": matmul_start[1],
        "matmul_cpu_gflops_end": matmul_end[1],
        "matmul_cpu_gflops_reference": reference_cpu,
        "stream_gbs": stream,
        "operator_seconds": operator_cost,
        "rss_imports_bytes": rss_imports,
        "rss_inputs_bytes": rss_inputs,
        "peak_rss_bytes": vm_hwm(),
        "peak_device_bytes": device_peak_bytes(device),
        "warm_up_layers": warm_ups,
        "timed_layers": timed,
        "phases": rec.rows,
        "solve": summary,
    }


def take_medians(
    rows: list[dict[str, Any]], repeats: list[list[dict[str, Any]]], summary: dict[str, Any]
) -> None:
    """Each phase of the last timed layer (``rows``) gets the median wall and CPU seconds of that phase
    over every timed layer, its own included (the values go to ``*_each_layer``), and ``summary`` the
    batched solve's medians. One layer's phase can be slowed by the host (these VM guests' rates move
    10-50% from run to run, see docs/PERFORMANCE.md); the median of three is not. The loop baseline runs
    in the last layer only, and keeps its one time."""

    def keyed(layer: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
        seen: dict[tuple[str, str], int] = {}
        out = {}
        for row in layer:  # "of which" rows follow both the batched solve and the loop: numbered
            name = (row["phase"], row["target"])
            seen[name] = seen.get(name, -1) + 1
            out[(*name, seen[name])] = row
        return out

    if not repeats:
        return
    others = [keyed(layer) for layer in repeats]
    for key, row in keyed(rows).items():
        matches = [other[key] for other in others if key in other]
        if not matches:
            continue
        for clock in ("seconds", "cpu_seconds"):
            row[f"{clock}_each_layer"] = [*(match[clock] for match in matches), row[clock]]
            row[clock] = statistics.median(row[f"{clock}_each_layer"])
    for target, s in summary.items():
        batched = next(row for row in rows if row["phase"] == "solve: batched" and row["target"] == target)
        s["batched_seconds"], s["batched_cpu_seconds"] = batched["seconds"], batched["cpu_seconds"]
        s["speedup_batched_vs_loop"] = s["loop_seconds_all_experts"] / batched["seconds"]
        s["speedup_batched_vs_loop_cpu"] = s["loop_cpu_seconds_all_experts"] / batched["cpu_seconds"]


def run_layer(
    cfg: dict[str, Any],
    p: Preset,
    scheme: Any,
    x: Any,
    mask: Any,
    gate_up_w: Any,
    down_w: Any,
    rec: Recorder,
    *,
    baseline: bool = False,
    operator_cost: float | None = None,
) -> dict[str, Any]:
    """One layer's phases into ``rec``, as the pipeline runs them; with ``baseline`` also the per-expert
    loop, whose comparison with the batched solve it returns, and with ``operator_cost`` (seconds per
    operator) the operator counts of both solves."""
    import torch
    import torch.nn.functional as F

    from moeconvert.quant.gptq import gptq_quantize
    from moeconvert.quant.hessian import CHUNK_ROWS, HessianAccumulator, rows_for_bf16_units
    from moeconvert.quant.packing import pack_compressed

    min_tokens, chunk = cfg["min_tokens"], cfg["max_experts_per_chunk"]
    scale_dtype = torch.bfloat16  # compressed-tensors stores scales in the model's dtype
    device = x.device
    rows = int(mask.sum())

    # Hessians, the way the pipeline's experts hook gathers them, in batches of calibration tokens.
    chunk_rows = cfg.get("hessian_chunk_rows") or CHUNK_ROWS
    acc_gate_up = HessianAccumulator(p.hidden, p.experts, chunk_size=chunk_rows)
    acc_down = HessianAccumulator(p.intermediate, p.experts, chunk_size=chunk_rows)
    batches = list(zip(x.split(cfg["batch_tokens"]), mask.split(cfg["batch_tokens"]), strict=True))
    rows_dtype = torch.bfloat16 if cfg.get("forward_dtype") == "checkpoint" else torch.float32
    with rec.phase("hessian: x x^T", "gate_up", hessian_flops(rows, p.hidden)):
        for xb, mb in batches:
            acc_gate_up.add(xb.to(rows_dtype), mb)
        flush_buffered_rows(acc_gate_up)
    down_inputs = []
    # the layer's experts in the forward dtype, as the pipeline holds them for its statistics passes
    gate_up_forward = gate_up_w.to(rows_dtype)
    label = "bf16" if rows_dtype == torch.bfloat16 else "fp32"
    flops = 2.0 * rows * p.hidden * 2 * p.intermediate
    with rec.phase(f"forward: act(gate)*up ({label})", "down", flops):
        for xb, mb in batches:
            per_expert = []
            for e in range(p.experts):
                expert_rows = xb[mb[:, e]].to(rows_dtype)
                gate, up = F.linear(rows_for_bf16_units(expert_rows), gate_up_forward[e]).chunk(2, dim=-1)
                per_expert.append((F.silu(gate) * up)[: expert_rows.shape[0]])
            down_inputs.append(per_expert)
    del gate_up_forward
    with rec.phase("hessian: x x^T", "down", hessian_flops(rows, p.intermediate)):
        for per_expert in down_inputs:
            acc_down.add_per_expert(per_expert)
        flush_buffered_rows(acc_down)
    del down_inputs

    summary: dict[str, Any] = {}
    for target, weight, acc in (("gate_up", gate_up_w, acc_gate_up), ("down", down_w, acc_down)):
        out, inp = weight.shape[1], weight.shape[2]
        cost = solve_flops(out, inp)
        with rec.phase("hessian: finalize", target):
            hessians, _ = acc.finalize(min_tokens, in_place=True)  # as the pipeline does
        w = weight  # bf16, as the pipeline hands it over: the solver widens it an expert at a time
        loop_experts = min(cfg["loop_experts"] or p.experts, p.experts)
        # the batched solve writes its factors over its own Hessians
        loop_hessians = hessians[:loop_experts].clone() if baseline else None

        parts: dict[str, list[float]] = {}
        solve_cost = sum(cost.values())
        # inputs for the counted runs, which come after the timed ones have overwritten theirs
        spare = (hessians.clone(), loop_hessians.clone()) if baseline and operator_cost else None
        with (
            timed_solver_parts(parts, device),
            rec.phase("solve: batched", target, p.experts * solve_cost) as batched_row,
        ):
            batched = gptq_quantize(
                w,
                hessians,
                scheme,
                max_experts_per_chunk=chunk,
                scale_dtype=scale_dtype,
                overwrite_hessian=True,
            )
        del hessians
        for part in ("prepare", "columns"):
            if part in parts:
                rec.rows.append(
                    {"phase": f"  of which {part}", "target": target}
                    | {"seconds": parts[part][0], "cpu_seconds": parts[part][1]}
                    | {"flops": p.experts * cost[part], "other_cores": None, "peak_rss_bytes": None}
                )

        with rec.phase("pack: compressed-tensors", target) as row:
            packed = pack_compressed(batched, scale_dtype)
            row["bytes"] = sum(t.numel() * t.element_size() for t in packed.values())
        with rec.phase("write: safetensors + fsync", target) as row:
            row["bytes"] = write_packed(
                packed, Path(cfg["write_dir"]) / f"{cfg['name']}-{target}.safetensors"
            )
        del packed
        if not baseline:
            del batched, w
            continue

        loop_parts: dict[str, list[float]] = {}
        with (
            timed_solver_parts(loop_parts, device),
            rec.phase("solve: loop over experts", target, loop_experts * solve_cost) as loop_row,
        ):
            looped = [
                gptq_quantize(w[e], loop_hessians[e], scheme, scale_dtype=scale_dtype, overwrite_hessian=True)
                for e in range(loop_experts)
            ]
        loop_row["experts_timed"] = loop_experts
        for part in ("prepare", "columns"):
            if part in loop_parts:
                rec.rows.append(
                    {"phase": f"  of which {part}", "target": target}
                    | {"seconds": loop_parts[part][0], "cpu_seconds": loop_parts[part][1]}
                    | {"flops": loop_experts * cost[part], "other_cores": None, "peak_rss_bytes": None}
                )
        differ = sum(int((q.codes != batched.codes[e]).sum()) for e, q in enumerate(looped))
        loop_seconds = loop_row["seconds"] * p.experts / loop_experts
        batched_seconds = batched_row["seconds"]
        loop_cpu = loop_row["cpu_seconds"] * p.experts / loop_experts
        summary[target] = {
            "loop_seconds_all_experts": loop_seconds,
            "loop_cpu_seconds_all_experts": loop_cpu,
            "loop_extrapolated": loop_experts < p.experts,
            "batched_seconds": batched_seconds,
            "batched_cpu_seconds": batched_row["cpu_seconds"],
            "speedup_batched_vs_loop": loop_seconds / batched_seconds,
            "speedup_batched_vs_loop_cpu": loop_cpu / batched_row["cpu_seconds"],
            "codes_differing_from_loop": differ / (loop_experts * out * inp),
        }
        if spare is not None:
            with operator_counter() as counted_batched:
                gptq_quantize(
                    w,
                    spare[0],
                    scheme,
                    max_experts_per_chunk=chunk,
                    scale_dtype=scale_dtype,
                    overwrite_hessian=True,
                )
            with operator_counter() as counted_loop:
                for e in range(loop_experts):
                    gptq_quantize(w[e], spare[1][e], scheme, scale_dtype=scale_dtype, overwrite_hessian=True)
            batched_ops, loop_ops = counted_batched.count, counted_loop.count
            summary[target] |= {
                "operators_batched": batched_ops,
                "operators_loop": loop_ops,
                "operators_loop_experts": loop_experts,
                "dispatch_share_batched": min(1.0, batched_ops * operator_cost / batched_row["seconds"]),
                "dispatch_share_loop": min(1.0, loop_ops * operator_cost / loop_row["seconds"]),
            }
            del spare
        del looped, batched, loop_hessians, w
    del acc_gate_up, acc_down
    return summary


# --------------------------------------------------------------------------------------------- parent


def choose_scale(
    p: Preset,
    tokens: int,
    requested: str,
    gflops: float,
    budget_s: float,
    loop_experts: int | None,
    chunk: int | None,
    memory_free: int,
    warm_up_layers: int = 0,
    timed_layers: int = 1,
) -> tuple[float, str]:
    """The width scale for a preset: the one asked for, or with ``auto`` the largest that fits.

    ``auto`` halves widths until the layer's estimated peak memory fits in 95% of ``memory_free`` (the
    host's available memory, or the GPU's free memory: :func:`moeconvert.memory.available_bytes`) and
    the estimated run time fits in the budget: Hessians and the batched solve of every layer run
    (warm-up and timed) and the loop baseline, at a third of the matmul rate (a lower bound of what the
    phases reach on a CPU).
    """
    loop_share = min(loop_experts or p.experts, p.experts) / p.experts
    rate = gflops / 3 * 1e9

    def estimate(scale: float) -> tuple[dict[str, float], float]:
        cost = preset_cost(scaled(p, scale), tokens, chunk)
        layers = timed_layers + warm_up_layers
        layer = cost["hessian"] + cost["forward"] + cost["solve"]
        return cost, (layers * layer + loop_share * cost["solve"]) / rate

    if requested != "auto":
        return float(requested), "asked for"
    scale, memory = 1.0, 0.95 * memory_free
    while scale > 1 / 16:
        cost, seconds = estimate(scale)
        if cost["peak_bytes"] <= memory and seconds <= budget_s:
            break
        scale /= 2
    if scale == 1.0:
        return scale, "full width"
    full, seconds = estimate(1.0)
    return scale, (
        f"at full width the layer needs ~{full['peak_bytes'] / 1e9:.0f} GB at its peak "
        f"({memory / 1e9:.0f} GB usable here) and ~{full['solve'] / 1e12:.0f} TFLOP of solve, "
        f"~{seconds / 60:.0f} min with the baseline here (budget {budget_s:.0f} s)"
    )


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        # huge pages for torch's tensors, as the command line sets them (moeconvert/cli.py)
        env={"THP_MEM_ALLOC_ENABLE": "1"} | os.environ | {"TQDM_DISABLE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def contended(row: dict[str, Any], r: dict[str, Any]) -> bool:
    """Whether other processes used more cores than this run left free while the phase ran."""
    spare = max(0, r["cpu_count"] - r["threads"])
    return row["other_cores"] is not None and row["other_cores"] > spare + BUSY


def print_preset(r: dict[str, Any]) -> None:
    p, full, counts = r["preset"], r["full_width_preset"], r["rows_per_expert"]
    width = f"H {p['hidden']}, I {p['intermediate']}"
    if r["width_scale"] != 1.0:
        width += f" (x{r['width_scale']:g} of H {full['hidden']}, I {full['intermediate']})"
    print(
        f"\n{r['name']}: {width}, {p['experts']} experts, top-{p['top_k']}; {r['tokens']} tokens "
        f"= {r['routed_rows']} routed rows, per expert {counts['min']}/{counts['median']:g}/{counts['max']} "
        f"(min/median/max), {counts['below_min_tokens']} below min_tokens {r['min_tokens']}; "
        f"{r['scheme']}, bf16 scales, experts per chunk {r['max_experts_per_chunk'] or 'all'}, "
        f"Hessian chunks of {r.get('hessian_chunk_rows', 512)} rows in {r.get('hessian_rows_dtype', 'float32')}"
    )
    if r["width_scale"] != 1.0:
        print(f"widths x{r['width_scale']:g}: {r['width_reason']}")
    n = r.get("matmul_size", 2048)
    gpu = (
        ""
        if r.get("peak_device_bytes") is None
        else f"; peak GPU memory {r['peak_device_bytes'] / 1e9:.2f} GB"
    )
    print(f"device: {r.get('device', 'cpu')} ({r.get('device_name', '')}){gpu}")
    middle = r.get("matmul_gflops_probes", [])[1:-1]
    probed = f", {' / '.join(f'{rate:.0f}' for rate in middle)} before the timed layers" if middle else ""
    print(
        f"fp32 matmul {n}^3: {r['matmul_gflops_start']:.0f} GFLOP/s at start, {r['matmul_gflops_end']:.0f} at end"
        f"{probed}, {r['matmul_gflops_reference']:.0f} the reference "
        f"({r['matmul_cpu_gflops_reference']:.0f} by CPU time); "
        f"a += b: {r['stream_gbs']:.0f} GB/s; threads {r['threads']} of {r['cpu_count']} CPUs; RSS after imports "
        f"{r['rss_imports_bytes'] / 1e9:.2f} GB, with inputs {r['rss_inputs_bytes'] / 1e9:.2f} GB"
    )
    on_gpu = r.get("peak_device_bytes") is not None
    gpu_width = 8 if on_gpu else 0  # a column of peak GPU memory on CUDA only
    print(
        f"{'phase':<30}{'target':<9}{'seconds':>9}{'cpu s':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'x matmul':>10}"
        f"{'(cpu)':>7}{'peak RSS GB':>13}{'GPU GB' if on_gpu else '':>{gpu_width}}{'other cores':>13}"
    )
    for row in r["phases"]:
        gflop = None if row["flops"] is None else row["flops"] / 1e9
        rss = None if row["peak_rss_bytes"] is None else row["peak_rss_bytes"] / 1e9
        device_peak = row.get("peak_device_bytes")
        gpu_gb = _fmt(None if device_peak is None else device_peak / 1e9, ".2f") if on_gpu else ""
        print(
            f"{row['phase']:<30}{row['target']:<9}{row['seconds']:>9.2f}{row['cpu_seconds']:>8.2f}"
            f"{_fmt(gflop, '.0f'):>8}{_fmt(row['gflops'], '.1f'):>9}{_fmt(row['of_matmul'], '.2f'):>10}"
            f"{_fmt(row['of_matmul_cpu'], '.2f'):>7}{_fmt(rss, '.2f'):>13}{gpu_gb:>{gpu_width}}"
            f"{_fmt(row['other_cores'], '.2f'):>13}{' *' if contended(row, r) else ''}"
        )
    for layer, rows in enumerate(r.get("warm_up_layers", []), start=1):
        _, products = rate_of(rows, "hessian: x x^T", r["matmul_gflops_reference"])
        solve, solve_rate = rate_of(rows, "solve: batched", r["matmul_gflops_reference"])
        hessian = rate_of(rows, "hessian", r["matmul_gflops_reference"])[0]
        print(
            f"warm-up layer {layer} (same inputs; the table is of the layers after it): Hessians {hessian:.2f} s, "
            f"x x^T at {_fmt(products, '.2f')} of the matmul rate; solve {solve:.2f} s at {_fmt(solve_rate, '.2f')}; "
            f"layer {layer_seconds(rows):.1f} s"
        )
    if r.get("timed_layers", 1) > 1:
        each = "; ".join(
            f"{row['phase']} {row['target']} " + " / ".join(f"{v:.2f}" for v in row["seconds_each_layer"])
            for row in r["phases"]
            if row["phase"] in ("hessian: x x^T", "solve: batched")
        )
        print(
            f"seconds are medians over {r['timed_layers']} timed layers (each layer's in the JSON): {each} s"
        )
    if any(contended(row, r) for row in r["phases"]):
        print(
            "* other processes wanted the cores this run's threads use during this phase; its time is inflated"
        )
    for target, s in r["solve"].items():
        note = " (loop extrapolated from a subset of experts)" if s["loop_extrapolated"] else ""
        print(
            f"solve {target}: batched {s['batched_seconds']:.1f} s, loop {s['loop_seconds_all_experts']:.1f} s, "
            f"batched is {s['speedup_batched_vs_loop']:.2f}x the loop ({s['speedup_batched_vs_loop_cpu']:.2f}x "
            f"by CPU time){note}; "
            f"codes differing from the loop: {s['codes_differing_from_loop']:.2e}"
        )
        if "operators_batched" in s:
            print(
                f"  operators issued: batched {s['operators_batched']:,} "
                f"({s['operators_batched'] / r['preset']['experts']:,.0f} per expert), loop "
                f"{s['operators_loop']:,} ({s['operators_loop'] / s['operators_loop_experts']:,.0f} per expert); "
                f"at {r['operator_seconds'] * 1e6:.1f} us each, Python and dispatch are "
                f"{s['dispatch_share_batched']:.1%} of the batched solve, {s['dispatch_share_loop']:.1%} of the loop"
            )


def rate_of(
    phases: list[dict[str, Any]], prefix: str, reference: float, clock: str = "seconds"
) -> tuple[float, float | None]:
    """Seconds (``clock``: wall or CPU) of the phases whose name starts with ``prefix``, and their FLOPs
    over that time as a fraction of the matmul rate (None when they count no FLOPs)."""
    rows = [x for x in phases if x["phase"].startswith(prefix)]
    seconds = sum(x[clock] for x in rows)
    flops = sum(x["flops"] or 0 for x in rows)
    return seconds, (flops / seconds / 1e9 / reference if flops and seconds else None)


def layer_seconds(phases: list[dict[str, Any]]) -> float:
    """The layer as the pipeline runs it: every phase but the loop baseline (and the "of which" rows)."""
    return sum(
        x["seconds"]
        for x in phases
        if x["phase"].split(":")[0] in LAYER_PHASES and not x["phase"].startswith("solve: loop")
    )


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """One preset's headline numbers, against the issue's targets: the solve and the Hessian products
    at >= 0.5 of the matmul rate, the per-expert loop >= 3x the batched solve's time."""
    phases, reference = r["phases"], r["matmul_gflops_reference"]
    forward, _ = rate_of(phases, "forward", reference)
    products, products_rate = rate_of(phases, "hessian: x x^T", reference)
    finalize, _ = rate_of(phases, "hessian: finalize", reference)
    solve, solve_rate = rate_of(phases, "solve: batched", reference)
    layer = layer_seconds(phases)
    loop = sum(s["loop_seconds_all_experts"] for s in r["solve"].values())
    reference_cpu = r["matmul_cpu_gflops_reference"]
    _, products_cpu = rate_of(phases, "hessian: x x^T", reference_cpu, "cpu_seconds")
    solve_cpu, solve_rate_cpu = rate_of(phases, "solve: batched", reference_cpu, "cpu_seconds")
    loop_cpu = sum(s["loop_cpu_seconds_all_experts"] for s in r["solve"].values())
    return {
        "forward_seconds": forward,
        "hessian_seconds": products + finalize,
        "hessian_products_of_matmul": products_rate,
        "solve_seconds": solve,
        "solve_of_matmul": solve_rate,
        "loop_seconds": loop,
        "loop_over_batched": loop / solve,
        "hessian_products_of_matmul_cpu": products_cpu,
        "solve_of_matmul_cpu": solve_rate_cpu,
        "loop_over_batched_cpu": loop_cpu / solve_cpu,
        "pack_seconds": rate_of(phases, "pack", reference)[0],
        "layer_seconds": layer,
        "write_seconds": rate_of(phases, "write", reference)[0],
        "peak_rss_gb": r["peak_rss_bytes"] / 1e9,
    }


def print_summary(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'preset':<18}{'scale':>6}{'tokens':>8}{'fwd s':>7}{'hessian s':>11}{'x matmul':>10}"
        f"{'solve s':>9}{'x matmul':>10}{'loop s':>8}{'loop/batched':>14}{'pack s':>8}{'write s':>9}{'layer s':>9}{'peak GB':>9}"
    )
    for r in results:
        s = r["summary"]
        print(
            f"{r['name']:<18}{r['width_scale']:>6g}{r['tokens']:>8}{s['forward_seconds']:>7.1f}"
            f"{s['hessian_seconds']:>11.1f}{_fmt(s['hessian_products_of_matmul'], '.2f'):>10}"
            f"{s['solve_seconds']:>9.1f}{_fmt(s['solve_of_matmul'], '.2f'):>10}{s['loop_seconds']:>8.1f}"
            f"{s['loop_over_batched']:>14.2f}{s['pack_seconds']:>8.2f}{s['write_seconds']:>9.2f}{s['layer_seconds']:>9.1f}"
            f"{s['peak_rss_gb']:>9.2f}"
        )
        print(
            f"{'  by CPU time':<18}{'':>6}{'':>8}{'':>7}{'':>11}{_fmt(s['hessian_products_of_matmul_cpu'], '.2f'):>10}"
            f"{'':>9}{_fmt(s['solve_of_matmul_cpu'], '.2f'):>10}{'':>8}{s['loop_over_batched_cpu']:>14.2f}"
        )
    print(
        "targets: solve and Hessian x x^T >= 0.50 of the matmul rate ('x matmul'); "
        "loop/batched >= 3 on qwen3-30b-a3b; on CUDA, a qwen3-30b-a3b layer at full calibration in <= 12 s "
        "('layer s'); 'peak GB' is the host's RSS"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="qwen3-30b-a3b")
    parser.add_argument(
        "--tokens",
        type=int,
        help=f"calibration tokens (default: per preset on CPU, see PRESETS; {FULL_CALIBRATION_TOKENS} on a GPU)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--width-scale",
        default="auto",
        help="scale hidden and intermediate widths (multiples of 128 kept); 'auto' shrinks only a preset "
        "whose estimated memory or time does not fit this machine (see --budget-s), and says so",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=400,
        help="'auto' width: seconds allowed per preset, estimated at a third of the matmul rate (the "
        "mixtral preset's half width, with its 4,096 tokens, three timed layers and a loop over all 8 "
        "experts, is estimated at 255-365 s and runs in about 200 s on a 2-core CPU)",
    )
    parser.add_argument("--max-experts-per-chunk", type=int, help="bound the solver's memory (default: all)")
    parser.add_argument(
        "--loop-experts", type=int, help="time the loop baseline on this many experts and extrapolate"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--min-tokens", type=int, default=128, help="the pipeline's starved-expert threshold")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per calibration batch")
    parser.add_argument(
        "--forward-dtype",
        choices=["float32", "checkpoint"],
        default="float32",
        help="the pipeline's option of that name: the dtype the Hessian rows arrive in (float32, or the "
        "checkpoint's bf16)",
    )
    parser.add_argument(
        "--hessian-chunk-rows",
        type=int,
        help="rows per Hessian chunk product (default: the pipeline's CHUNK_ROWS); on a GPU, where 512-row "
        "chunks make many small launches, larger ones trade pending-row memory for fewer of them",
    )
    parser.add_argument(
        "--count-operators",
        action="store_true",
        help="count the solves' operators (in untimed runs on copies of their inputs) and estimate the "
        "share of the timed solves that is Python and dispatch",
    )
    parser.add_argument(
        "--warm-up-layers",
        type=int,
        default=1,
        help="layers run before the timed one, on the same inputs (0: time a process's first layer)",
    )
    parser.add_argument(
        "--timed-layers",
        type=int,
        default=1,
        help="layers timed after the warm-up ones; with several, each phase reads the median of them (the "
        "loop baseline runs in the last)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/quantize.json"))
    parser.add_argument(
        "--write-dir",
        type=Path,
        default=Path("bench_results"),
        help="where the write phase writes (and deletes)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm_up_layers < 0:
        parser.error("--warm-up-layers must be 0 or more")
    if args.timed_layers < 1:
        parser.error("--timed-layers must be 1 or more")

    if args.worker:  # one preset in a fresh process; the result is the last stdout line
        print(json.dumps(run_preset(json.loads(args.worker))))
        return

    import torch

    from moeconvert.memory import available_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gflops, _ = matmul_gflops(device)
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    results = []
    for name in names:
        full = PRESETS[name]
        tokens = args.tokens or (FULL_CALIBRATION_TOKENS if device.type == "cuda" else full.tokens)
        scale, why = choose_scale(
            full,
            tokens,
            args.width_scale,
            gflops,
            args.budget_s,
            args.loop_experts,
            args.max_experts_per_chunk,
            available_bytes(device),
            args.warm_up_layers,
            args.timed_layers,
        )
        if scale != 1.0:
            print(f"{name}: widths x{scale:g} ({why})", file=sys.stderr)
        cfg = {
            "name": name,
            "preset": asdict(scaled(full, scale)),
            "full_preset": asdict(full),
            "width_scale": scale,
            "width_reason": why,
            "tokens": tokens,
            "max_experts_per_chunk": args.max_experts_per_chunk,
            "loop_experts": args.loop_experts,
            "bits": args.bits,
            "group_size": args.group_size,
            "min_tokens": args.min_tokens,
            "batch_tokens": args.batch_tokens,
            "forward_dtype": args.forward_dtype,
            "hessian_chunk_rows": args.hessian_chunk_rows,
            "seed": args.seed,
            "warm_up_layers": args.warm_up_layers,
            "timed_layers": args.timed_layers,
            "threads": args.threads,
            "device": args.device,
            "write_dir": str(args.write_dir),
            "count_operators": args.count_operators,
        }
        result = run_worker(cfg) | {"width_reason": why}
        result["summary"] = summarize(result)
        print_preset(result)
        results.append(result)
    print_summary(results)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "solve_flops_model": "per expert [out, in]: out*in^2 (error feedback) + in^3/3 + 128*in^2 (Cholesky, block products)",
        "hessian_flops_model": "2*rows*in^2 per expert",
        "presets": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
