"""Peak memory of quantize and verify: flat in depth, and one Mixtral-8x7B-width layer within this machine.

Depth: builds two synthetic Mixtral-style checkpoints (random bf16 weights, transformers' own classes)
that differ only in depth, runs `quantize` (GPTQ, few calibration tokens) and `verify` on each in a fresh
process, and reads each process's peak RSS (VmHWM). Streaming by layer means the 8-layer model should
peak where the 2-layer one does, although it is 4x larger.

Width (`--mixtral-layer`): one decoder layer at Mixtral-8x7B's widths (hidden 4096, 8 experts of 14336,
top-2, 32 heads, 8 KV heads, vocabulary 32000; 2.8 GB of bf16 experts, whose down-projection Hessians
alone are 8 x 14336^2 floats), quantized GPTQ w4 g128 with a stated, reduced number of calibration
tokens, in a fresh process, with its peak RSS and the machine's memory beside it.

Wide experts (`--qwen3-235b-layer`): one decoder layer at Qwen3-235B-A22B's widths (hidden 4096, 128
experts of 1536, top-8, 64 heads of 128, 4 KV heads; vocabulary cut to 32000), whose gate/up running
sums (128 x 4096^2 floats, 8.6 GB) are larger than its bf16 experts (4.8 GB): the dry-run estimate with
the sums held and with them replayed from the kept inputs, then a real run with them replayed (bf16
forward passes), in a fresh process, with its peak RSS.

Many experts (`--qwen3-30b-layer`): one decoder layer at Qwen3-30B-A3B's widths (hidden 2048, 128
experts of 768, top-8, 32 heads of 128, 4 KV heads; vocabulary cut to 32000), quantized with default
options in a fresh process, for each checkout given by `--checkout` (default: this one) in turn and
`--repeat` rounds, alternating: the same layer and tokens, so two versions of the code compare in one run
(with a digest of the weights each wrote, and the peak of anonymous memory, sampled, beside the peak RSS,
which also counts mapped file pages the OS may drop; with `--memory-limit` each run is held to that
many bytes by a memory cgroup, and a run the kernel kills is reported). `--deepseek-v2-lite-layer` does the same at DeepSeek-V2-Lite's
widths (hidden 2048, 64 experts of 1408, top-6, 2 shared experts, latent attention), and
`--mixtral-1024-layer` at the width of `--activations`, where many tokens cost little compute.

Prints a table and writes JSON.

    python scripts/bench_memory.py --hidden 1024 --out bench_results/memory.json
    python scripts/bench_memory.py --mixtral-layer --samples 4 --seq-len 512 --out bench_results/memory-mixtral.json
    python scripts/bench_memory.py --activations --samples 128 --out bench_results/memory-activations.json
    python scripts/bench_memory.py --qwen3-235b-layer --samples 4 --seq-len 512 --forward-dtype checkpoint \
        [--experts-per-chunk 1] --out bench_results/memory-qwen3-235b.json
    python scripts/bench_memory.py --qwen3-30b-layer --samples 4 --seq-len 512 --checkout . ../before \
        --repeat 2 --out bench_results/memory-qwen3-30b.json
    sudo python scripts/bench_memory.py --qwen3-30b-layer --samples 32 --seq-len 2048 --checkout . ../before \
        --memory-limit 9.75e9 --out bench_results/memory-qwen3-30b-limited.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import json, os, sys, threading, time
import torch
import moeconvert
import moeconvert.pipeline
from moeconvert.pipeline import QuantizeOptions
peak_anon = [0]  # the kernel keeps no high-water mark of anonymous memory alone: sampled every 10 ms
def sample_anon():
    while True:
        anon = next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]
        peak_anon[0] = max(peak_anon[0], int(anon) * 1024)
        time.sleep(0.01)
threading.Thread(target=sample_anon, daemon=True).start()
if "BENCH_SPILL_BYTES" in os.environ:
    moeconvert.pipeline.SPILL_BYTES = int(os.environ["BENCH_SPILL_BYTES"])
step, source, out, samples, seq_len, forward, statistics = sys.argv[1:8]
samples, seq_len = int(samples), int(seq_len)
t = time.perf_counter()
if step in ("quantize", "estimate"):
    chunk = int(os.environ["BENCH_EXPERTS_PER_CHUNK"]) if "BENCH_EXPERTS_PER_CHUNK" in os.environ else None
    options = QuantizeOptions(samples=samples, seq_len=seq_len, forward_dtype=forward, expert_statistics=statistics,
                              experts_per_chunk=chunk)
    report = moeconvert.quantize(source, moeconvert.Scheme(bits=4, group_size=128), output=out, options=options,
                                 verify=False, progress=False, dry_run=step == "estimate")
    if step == "estimate":
        print(json.dumps(report.sizes))
        sys.exit()
    extra = {"device": report.device, "layer_seconds": [layer.seconds for layer in report.layers]}
else:
    report = moeconvert.verify(source, out, samples=samples, seq_len=seq_len, progress=False)
    extra = {"device": report.device}
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
if torch.cuda.is_initialized():
    extra["peak_gpu"] = torch.cuda.max_memory_allocated()
extra["peak_anon"] = peak_anon[0]
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": int(hwm) * 1024, **extra}))
"""


def run_step(
    step: str,
    source: Path,
    out: Path,
    samples: int = 4,
    seq_len: int = 256,
    forward: str = "float32",
    spill_bytes: int | None = None,
    statistics: str = "auto",
    experts_per_chunk: int | None = None,
    checkout: Path | None = None,
    cgroup: Path | None = None,
) -> dict:
    """Run one step in a fresh process; ``checkout``: a source tree whose ``moeconvert`` it imports (it
    runs there: ``python -c`` puts its working directory first on the path); ``cgroup``: a memory
    cgroup the process joins before it starts (see ``memory_cgroup``)."""
    # two threads, as on the 2-core machine of docs/PERFORMANCE.md, unless OMP_NUM_THREADS says otherwise
    env = {"TQDM_DISABLE": "1", "PATH": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    # huge pages for torch's tensors, as the command line sets them (moeconvert/cli.py)
    env["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "1")
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout.resolve())
    if spill_bytes is not None:
        env["BENCH_SPILL_BYTES"] = str(spill_bytes)
    if experts_per_chunk is not None:
        env["BENCH_EXPERTS_PER_CHUNK"] = str(experts_per_chunk)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STEP,
            step,
            str(source),
            str(out),
            str(samples),
            str(seq_len),
            forward,
            statistics,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=None if checkout is None else checkout.resolve(),
        preexec_fn=None if cgroup is None else lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())),
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_cgroup(limit: int) -> Path:
    """A fresh memory cgroup that holds its processes to ``limit`` bytes, anonymous memory and page
    cache together (cgroup v2's ``memory.max``, or v1's ``memory.limit_in_bytes``; needs root). Under
    it the kernel reclaims clean file pages and kills a process whose anonymous memory alone passes."""
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    root, knob = (v2, "memory.max") if (v2 / "cgroup.controllers").exists() else (v1, "memory.limit_in_bytes")
    group = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=root))
    (group / knob).write_text(str(limit))
    return group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--depths", type=int, nargs=2, default=(2, 8))
    parser.add_argument("--out", type=Path, default=Path("bench_results/memory.json"))
    parser.add_argument("--mixtral-layer", action="store_true", help="one layer at Mixtral-8x7B widths")
    parser.add_argument(
        "--qwen3-235b-layer",
        action="store_true",
        help="one layer at Qwen3-235B-A22B widths, statistics replayed",
    )
    parser.add_argument(
        "--qwen3-30b-layer", action="store_true", help="one layer at Qwen3-30B-A3B widths, default options"
    )
    parser.add_argument(
        "--deepseek-v2-lite-layer",
        action="store_true",
        help="one layer at DeepSeek-V2-Lite widths (shared experts), default options",
    )
    parser.add_argument(
        "--mixtral-1024-layer",
        action="store_true",
        help="one Mixtral-style layer of hidden 1024 (the width of --activations), default options",
    )
    parser.add_argument(
        "--checkout",
        type=Path,
        nargs="+",
        default=[Path(__file__).resolve().parent.parent],
        help="source trees to measure, in turn (--qwen3-30b-layer, --deepseek-v2-lite-layer)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over the checkouts (--qwen3-30b-layer, ...)"
    )
    parser.add_argument(
        "--memory-limit",
        help="bytes (e.g. 9.75e9): each run in a memory cgroup of this size, as root (--qwen3-30b-layer, ...)",
    )
    parser.add_argument(
        "--activations",
        action="store_true",
        help="one layer, many calibration tokens: peak with the activations kept vs spilled during the solve",
    )
    parser.add_argument(
        "--samples", type=int, default=4, help="calibration sequences (--mixtral-layer, --activations)"
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (--mixtral-layer)")
    parser.add_argument(
        "--experts-per-chunk",
        type=int,
        help="GPTQ problems solved at once (--qwen3-235b-layer; default: auto)",
    )
    parser.add_argument(
        "--forward-dtype", default="float32", choices=["float32", "checkpoint"], help="(--mixtral-layer)"
    )
    args = parser.parse_args()
    if args.mixtral_layer:
        mixtral_layer(args)
        return
    if args.activations:
        activations(args)
        return
    if args.qwen3_235b_layer:
        qwen3_235b_layer(args)
        return
    if args.qwen3_30b_layer:
        compared_layer(args, "qwen3-30b")
        return
    if args.deepseek_v2_lite_layer:
        compared_layer(args, "deepseek-v2-lite")
        return
    if args.mixtral_1024_layer:
        compared_layer(args, "mixtral-1024")
        return

    import torch

    from moeconvert.checkpoint import ShardedReader
    from moeconvert.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    rows = []
    try:
        for depth in args.depths:
            src = build_tiny_model(
                "mixtral", work / f"src{depth}", dtype=torch.bfloat16, hidden_size=args.hidden,
                intermediate_size=int(3.5 * args.hidden), num_hidden_layers=depth, num_local_experts=args.experts,
                num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
            )  # fmt: skip
            with ShardedReader(src) as reader:
                total = reader.total_bytes
                layer = max(
                    sum(reader.metas[n].nbytes for n in names)
                    for key, names in reader.layer_names().items()
                    if key is not None
                )
            quant = run_step("quantize", src, work / f"q{depth}")
            parity = run_step("verify", src, work / f"q{depth}")
            rows.append(
                {
                    "layers": depth,
                    "model_bytes": total,
                    "layer_bytes": layer,
                    "quantize": quant,
                    "verify": parity,
                }
            )
            shutil.rmtree(work / f"q{depth}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "hidden": args.hidden,
        "experts": args.experts,
        "rows": rows,
    }
    print(
        f"{'layers':>6}{'model MB':>10}{'layer MB':>10}{'quantize peak MB':>18}{'verify peak MB':>16}{'q s':>7}{'v s':>7}"
    )
    for r in rows:
        print(
            f"{r['layers']:>6}{r['model_bytes'] / 1e6:>10.0f}{r['layer_bytes'] / 1e6:>10.0f}"
            f"{r['quantize']['peak_rss'] / 1e6:>18.0f}{r['verify']['peak_rss'] / 1e6:>16.0f}"
            f"{r['quantize']['seconds']:>7.1f}{r['verify']['seconds']:>7.1f}"
        )
    a, b = rows[0], rows[-1]
    for step in ("quantize", "verify"):
        print(
            f"{step}: peak at {b['layers']} layers / at {a['layers']} layers = {b[step]['peak_rss'] / a[step]['peak_rss']:.3f} (model {b['model_bytes'] / a['model_bytes']:.1f}x larger)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def one_layer_run(args: argparse.Namespace, model_bytes: int, expert_bytes: int) -> dict:
    """What a one-layer result records besides its own numbers: the machine and the layer's sizes."""
    import psutil
    import torch

    return {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "memory_total": psutil.virtual_memory().total,
        "model_bytes": model_bytes,
        "expert_bytes": expert_bytes,
        "calibration_tokens": args.samples * args.seq_len,
    }


def one_layer_model(work: Path, family: str, **config: int) -> tuple[Path, int, int]:
    """A one-layer bf16 model of ``family`` with ``config`` in ``work/src``: its folder, its bytes, and the
    bytes of its routed experts."""
    import torch

    from moeconvert.checkpoint import ShardedReader
    from moeconvert.tiny import build_tiny_model

    src = build_tiny_model(family, work / "src", dtype=torch.bfloat16, num_hidden_layers=1, **config)
    with ShardedReader(src) as reader:
        total = reader.total_bytes
        experts = sum(m.nbytes for n, m in reader.metas.items() if ".experts." in n)
    return src, total, experts


def mixtral_layer(args: argparse.Namespace) -> None:
    """One Mixtral-8x7B-width layer: build it, quantize it in a fresh process, report the peak."""
    work = Path(tempfile.mkdtemp(prefix="bench_memory_mixtral_"))
    try:
        src, total, experts = one_layer_model(
            work, "mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
            num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        )  # fmt: skip
        quant = run_step("quantize", src, work / "q", args.samples, args.seq_len, args.forward_dtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    down_sums = 8 * 14336 * 14336 * 4  # float32 running sums (moeconvert.quant.hessian.SUMS_DTYPE)
    result = {
        **one_layer_run(args, total, experts),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "forward_dtype": args.forward_dtype,
        "down_hessian_sums_bytes": down_sums,
        "quantize": quant,
    }
    gb = 1e9
    print(
        f"{'model GB':>9}{'experts GB':>11}{'tokens':>8}{'down sums GB':>13}{'peak GB':>9}{'machine GB':>11}{'s':>7}"
    )
    print(
        f"{total / gb:>9.2f}{experts / gb:>11.2f}{result['calibration_tokens']:>8}{down_sums / gb:>13.2f}"
        f"{quant['peak_rss'] / gb:>9.2f}{result['memory_total'] / gb:>11.2f}{quant['seconds']:>7.0f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def qwen3_235b_layer(args: argparse.Namespace) -> None:
    """One Qwen3-235B-A22B-width layer: build it, estimate its peak with the gate/up sums held and
    replayed, quantize it with them replayed in a fresh process, report the peak."""
    work = Path(tempfile.mkdtemp(prefix="bench_memory_qwen3_235b_"))
    try:
        src, total, experts = one_layer_model(
            work, "qwen3_moe", hidden_size=4096, moe_intermediate_size=1536, intermediate_size=12288,
            num_experts=128, num_experts_per_tok=8, num_attention_heads=64, num_key_value_heads=4,
            head_dim=128, vocab_size=32000,
        )  # fmt: skip
        sizes = {"samples": args.samples, "seq_len": args.seq_len, "forward": args.forward_dtype}
        estimates = {
            mode: run_step("estimate", src, work / "q", **sizes, statistics=mode)["peak_memory_bytes"]
            for mode in ("held", "replayed")
        }
        chunk = args.experts_per_chunk
        quant = run_step("quantize", src, work / "q", **sizes, statistics="replayed", experts_per_chunk=chunk)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gate_up_sums = 128 * 4096 * 4096 * 4  # float32 running sums (moeconvert.quant.hessian.SUMS_DTYPE)
    result = {
        **one_layer_run(args, total, experts),
        "forward_dtype": args.forward_dtype,
        "experts_per_chunk": args.experts_per_chunk or "auto (up to half the free memory)",
        "gate_up_sums_bytes": gate_up_sums,
        "estimate_held": estimates["held"],
        "estimate_replayed": estimates["replayed"],
        "quantize_replayed": quant,
    }
    gb = 1e9
    print(
        f"{'model GB':>9}{'experts GB':>11}{'tokens':>8}{'gate/up sums GB':>16}{'est. held GB':>13}"
        f"{'est. replayed GB':>17}{'peak GB':>9}{'machine GB':>11}{'s':>7}"
    )
    print(
        f"{total / gb:>9.2f}{experts / gb:>11.2f}{result['calibration_tokens']:>8}{gate_up_sums / gb:>16.2f}"
        f"{estimates['held'] / gb:>13.2f}{estimates['replayed'] / gb:>17.2f}{quant['peak_rss'] / gb:>9.2f}"
        f"{result['memory_total'] / gb:>11.2f}{quant['seconds']:>7.0f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


# One decoder layer of each model, as ``compared_layer`` builds it: family and config overrides.
COMPARED_LAYERS = {
    "qwen3-30b": (
        "qwen3_moe",
        dict(
            hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
            num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            vocab_size=32000,
        ),
    ),  # DeepSeek-V2-Lite: its shared experts run after the routed ones; multi-head latent attention
    "deepseek-v2-lite": (
        "deepseek_v2",
        dict(
            hidden_size=2048, moe_intermediate_size=1408, intermediate_size=10944, n_routed_experts=64,
            n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=0, num_attention_heads=16,
            num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, vocab_size=32000,
        ),
    ),
    # the width of --activations: many calibration tokens cost little compute, so activations weigh
    "mixtral-1024": (
        "mixtral",
        dict(
            hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000,
        ),
    ),
}  # fmt: skip


def compared_layer(args: argparse.Namespace, name: str) -> None:
    """One layer of ``COMPARED_LAYERS[name]`` quantized by each checkout in turn, ``--repeat`` rounds."""
    work = Path(tempfile.mkdtemp(prefix=f"bench_memory_{name}_"))
    runs = []
    family, config = COMPARED_LAYERS[name]
    cgroup = None if args.memory_limit is None else memory_cgroup(int(float(args.memory_limit)))
    try:
        src, total, experts = one_layer_model(work, family, **config)
        for round_ in range(args.repeat):
            for checkout in args.checkout:
                out = work / "q"
                try:
                    run = run_step(
                        "quantize", src, out, args.samples, args.seq_len, checkout=checkout, cgroup=cgroup
                    )
                except subprocess.CalledProcessError as err:
                    if cgroup is None:
                        raise
                    runs.append({"round": round_, "checkout": str(checkout), "exit": err.returncode})
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                weights = [
                    line for line in (out / "SHA256SUMS").read_text().splitlines() if "safetensors" in line
                ]
                digest = hashlib.sha256("\n".join(weights).encode()).hexdigest()[:16]  # the card has timings
                runs.append({"round": round_, "checkout": str(checkout), **run, "output": digest})
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cgroup is not None:
            cgroup.rmdir()
    result = {**one_layer_run(args, total, experts), "memory_limit": args.memory_limit, "runs": runs}
    gb = 1e9
    print(f"model {total / gb:.2f} GB, experts {experts / gb:.2f} GB, {result['calibration_tokens']} tokens")
    print(
        f"{'round':>5}  {'checkout':<40}{'device':>8}{'peak GB':>9}{'anon GB':>9}{'GPU GB':>8}{'s':>8}"
        f"{'layer s':>9}  weights (digest of their SHA-256s)"
    )
    if cgroup is not None:
        print(f"each run in a memory cgroup of {float(args.memory_limit) / gb:.2f} GB")
    for r in runs:
        if "exit" in r:
            end = "killed by the kernel (out of memory)" if r["exit"] == -9 else f"exited {r['exit']}"
            print(f"{r['round']:>5}  {r['checkout']:<40}  {end}")
            continue
        layer = sum(r.get("layer_seconds", []))
        print(
            f"{r['round']:>5}  {r['checkout']:<40}{r.get('device', '?'):>8}{r['peak_rss'] / gb:>9.2f}"
            f"{r.get('peak_anon', float('nan')) / gb:>9.2f}"
            f"{r['peak_gpu'] / gb if 'peak_gpu' in r else float('nan'):>8.2f}"
            f"{r['seconds']:>8.1f}{layer:>9.1f}  {r['output']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def activations(args: argparse.Namespace) -> None:
    """One Mixtral-style layer (width ``--hidden``) with ``--samples x --seq-len`` calibration tokens,
    quantized twice in fresh processes: calibration activations kept in memory throughout, and spilled
    while the layer is solved (``moeconvert.pipeline.SPILL_BYTES``: never vs always)."""
    import torch

    from moeconvert.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_memory_activations_"))
    rows = []
    try:
        src = build_tiny_model(
            "mixtral", work / "src", dtype=torch.bfloat16, hidden_size=args.hidden,
            intermediate_size=int(3.5 * args.hidden), num_hidden_layers=1, num_local_experts=args.experts,
            num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
        )  # fmt: skip
        for label, spill in (("kept", 1 << 62), ("spilled", 0)):
            run = run_step("quantize", src, work / label, args.samples, args.seq_len, spill_bytes=spill)
            rows.append({"activations": label, **run})
            shutil.rmtree(work / label)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = args.samples * args.seq_len
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "hidden": args.hidden,
        "experts": args.experts,
        "calibration_tokens": tokens,
        "activation_bytes": tokens * args.hidden * 4,
        "rows": rows,
    }
    print(f"{'activations':>12}{'tokens':>8}{'activations MB':>16}{'peak MB':>9}{'s':>7}")
    for r in rows:
        print(
            f"{r['activations']:>12}{tokens:>8}{result['activation_bytes'] / 1e6:>16.0f}"
            f"{r['peak_rss'] / 1e6:>9.0f}{r['seconds']:>7.1f}"
        )
    saved = rows[0]["peak_rss"] - rows[1]["peak_rss"]
    print(
        f"peak lowered by {saved / 1e6:.0f} MB ({saved / result['activation_bytes']:.2f} of the activations)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
