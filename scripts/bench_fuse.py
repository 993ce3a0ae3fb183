"""Benchmark fuse/unfuse throughput against a plain copy of the same shards, and their peak memory.

Builds a synthetic Mixtral-style checkpoint (random bf16 weights, transformers' own classes; about
2.1 GB by default), then times, in rounds, five steps on it, each in a fresh process:

- ``copy``: ``shutil.copyfile`` of every shard (what the disk and page cache allow);
- ``copy+fsync``: the same, each shard fsynced after its copy: the durable I/O limit of a plain copy,
  since fuse and unfuse fsync every shard before the output folder is renamed into place;
- ``copy+wb``: each shard copied in 1 MiB writes with its writeback started behind them, as fuse and
  unfuse write (``moeconvert.writeback``), then fsynced: the durable limit of that way of writing;
- ``fuse`` and ``unfuse`` (of fuse's output), with ``max_shard_size="1GB"``.

Fuse and unfuse first import torch and transformers and build transformers' model class on the meta
device once (a one-time cost of a few seconds, reported as ``setup``, outside the timing; the copies
need none of it), then each step resets its process's peak RSS and runs. Peak RSS is reported above the RSS at that start, in units
of the largest layer. The source stays in the page cache (it is read in every round), so this
measures the conversion against the copy, not the disk's read speed.

Page-cache supply. On the VM guests this was developed on, page-cache pages for new data come at
0.4 GB/s when the kernel has to take memory that has been free for a while (the guest hands free memory
back to the host, which faults it back in), and at several GB/s when memory was freed just before: the
same unfuse took 5.9 s, then 1.6 s right after its first output was deleted. Without care the order of
the steps decides which of them is slow. So each step, after its setup and before its timing, writes
and deletes a scratch file as large as the source; every step, the copies included, then starts from
the same supply.

Also measured, in this process before the rounds: ``hashlib.sha256`` on one core, a bound for fuse
and unfuse, which hash every byte they write (for the output's SHA256SUMS).

Prints a table (best of ``--repeat`` rounds, and the median) and writes JSON.

    python scripts/bench_fuse.py --layers 11 --hidden 1024 --repeat 3 --out bench_results/fuse.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = r"""
import json, os, shutil, sys, time
from pathlib import Path

step, src, dst = sys.argv[1:4]
src, dst = Path(src), Path(dst)

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

def copy(sync):
    dst.mkdir()
    for path in sorted(src.glob("*.safetensors")):
        shutil.copyfile(path, dst / path.name)
        if sync:
            fd = os.open(dst / path.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

def prime_page_cache(size):
    # Write and delete a scratch file as large as the source: the step then writes into just-freed
    # page-cache pages, as every step does (see "Page-cache supply" in the module docstring).
    scratch, block = dst.parent / (dst.name + ".prime"), memoryview(bytearray(1 << 20))
    with open(scratch, "wb", buffering=0) as f:
        for _ in range(0, size, 1 << 20):
            f.write(block)
    scratch.unlink()

def copy_with_writeback():
    dst.mkdir()
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as source, open(dst / path.name, "wb", buffering=0) as out:
            behind, end = WritebackBehind(out.fileno()), 0
            while chunk := source.read(1 << 20):
                end += out.write(chunk)
                behind.written(end)
            os.fsync(out.fileno())

setup = time.perf_counter()
if step == "copy+wb":
    from moeconvert.writeback import WritebackBehind
if step in ("fuse", "unfuse"):  # the copies need none of it
    import moeconvert, moeconvert.relayout
    from moeconvert.families import load_config
    from moeconvert.source import read_config
    moeconvert.relayout.model_shapes(load_config(read_config(src)))  # transformers' modeling import
setup = time.perf_counter() - setup
prime_page_cache(sum(p.stat().st_size for p in src.glob("*.safetensors")))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
start_rss = status("VmRSS")
t = time.perf_counter()
if step in ("copy", "copy+fsync"):
    copy(step == "copy+fsync")
elif step == "copy+wb":
    copy_with_writeback()
else:
    getattr(moeconvert, step)(str(src), str(dst), max_shard_size="1GB")
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "setup_seconds": setup, "start_rss": start_rss,
                  "peak_rss": status("VmHWM")}))
"""

STEPS = ("copy", "copy+fsync", "copy+wb", "fuse", "unfuse")


def run_step(step: str, src: Path, dst: Path) -> dict:
    env = {
        "TQDM_DISABLE": "1",
        "PATH": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        # huge pages for torch's tensors, as the command line sets them (moeconvert/cli.py)
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
    }
    out = subprocess.run(
        [sys.executable, "-c", STEP, step, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        cwd=dst.parent,  # not the repository: `-c` puts the working folder first on sys.path
    )
    if out.returncode != 0:
        raise SystemExit(f"{step} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_source(args: argparse.Namespace, work: Path) -> Path:
    import torch

    from moeconvert.tiny import build_tiny_model

    return build_tiny_model(
        "mixtral", work / "src", dtype=torch.bfloat16, max_shard_size="1GB",
        hidden_size=args.hidden, intermediate_size=int(3.5 * args.hidden), num_hidden_layers=args.layers,
        num_local_experts=args.experts, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
    )  # fmt: skip


def sizes(src: Path) -> tuple[int, int]:
    """Bytes of all shards, and of the largest group (layer) of tensors."""
    from moeconvert.checkpoint import ShardedReader

    with ShardedReader(src) as reader:
        layer = max(sum(reader.metas[n].nbytes for n in names) for names in reader.layer_names().values())
    return sum(p.stat().st_size for p in src.glob("*.safetensors")), layer


def run_round(src: Path, work: Path) -> dict[str, dict]:
    """One run of every step; outputs are deleted as soon as they are no longer needed."""
    runs = {}
    for step in STEPS:
        source = work / "fuse" if step == "unfuse" else src
        runs[step] = run_step(step, source, work / step)
        if step == "fuse":
            runs[step]["manifest"] = (work / "fuse" / "SHA256SUMS").read_text()
        else:
            shutil.rmtree(work / step)
    shutil.rmtree(work / "fuse")
    return runs


def summarize(rounds: list[dict[str, dict]], model_bytes: int, layer_bytes: int) -> dict[str, dict]:
    rows = {}
    for step in STEPS:
        seconds = [r[step]["seconds"] for r in rounds]
        over = max(r[step]["peak_rss"] - r[step]["start_rss"] for r in rounds)
        rows[step] = {
            "best_seconds": min(seconds),
            "median_seconds": statistics.median(seconds),
            "best_gb_per_s": model_bytes / min(seconds) / 1e9,
            "median_gb_per_s": model_bytes / statistics.median(seconds) / 1e9,
            "setup_seconds": statistics.median(r[step]["setup_seconds"] for r in rounds),
            "peak_rss_over_start_bytes": over,
            "peak_rss_over_start_layers": over / layer_bytes,
        }
    for row in rows.values():
        for base in ("copy", "copy+fsync"):
            row[f"vs_{base}_best"] = row["best_gb_per_s"] / rows[base]["best_gb_per_s"]
            row[f"vs_{base}_median"] = row["median_gb_per_s"] / rows[base]["median_gb_per_s"]
    return rows


def _proc_field(path: str, key: str) -> str:
    lines = Path(path).read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "?")


def sha256_gb_per_s(size: int = 1 << 28, repeat: int = 3) -> float:
    """Best of a few hashes of ``size`` bytes (hashlib releases the GIL and uses SHA-NI where present)."""
    data = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


def machine() -> dict[str, object]:
    import torch

    cpu, ram = _proc_field("/proc/cpuinfo", "model name"), _proc_field("/proc/meminfo", "MemTotal")

    return {
        "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "ram": ram,
        "python": platform.python_version(), "torch": torch.__version__,
    }  # fmt: skip


def print_table(result: dict) -> None:
    print(
        f"model {result['model_bytes'] / 1e9:.2f} GB, largest layer {result['largest_group_bytes'] / 1e6:.0f} MB, "
        f"best and median of {result['repeat']} rounds, "
        f"load average {result['load_average_before_after'][0]:.1f} -> {result['load_average_before_after'][1]:.1f}"
    )
    print(
        f"{'step':<11}{'best s':>8}{'median s':>10}{'GB/s':>7}{'x copy':>8}{'x copy+fsync':>14}"
        f"{'peak RSS over start':>21}"
    )
    for step, r in result["rows"].items():
        print(
            f"{step:<11}{r['best_seconds']:>8.2f}{r['median_seconds']:>10.2f}{r['best_gb_per_s']:>7.2f}"
            f"{r['vs_copy_best']:>8.2f}{r['vs_copy+fsync_best']:>14.2f}"
            f"{r['peak_rss_over_start_bytes'] / 1e6:>11.0f} MB ={r['peak_rss_over_start_layers']:>5.2f} L"
        )
    print(f"sha256 on one core: {result['sha256_gb_per_s']:.2f} GB/s (fuse and unfuse hash all they write)")
    print(f"setup (transformers' modeling import, excluded): {result['rows']['fuse']['setup_seconds']:.1f} s")
    print(f"fuse output identical in every round: {result['fuse_outputs_identical']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--source", type=Path, help="an existing checkpoint to use instead of building one")
    parser.add_argument("--out", type=Path, default=Path("bench_results/fuse.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_fuse_"))
    try:
        src = args.source or build_source(args, work)
        model_bytes, layer_bytes = sizes(src)
        load_before, sha256 = os.getloadavg(), sha256_gb_per_s()
        rounds = [run_round(src, work) for _ in range(args.repeat)]
        result = {
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            "sha256_gb_per_s": sha256,
            "model_bytes": model_bytes,
            "largest_group_bytes": layer_bytes,
            "repeat": args.repeat,
            "machine": machine(),
            "fuse_outputs_identical": len({r["fuse"].pop("manifest") for r in rounds}) == 1,
            "rows": summarize(rounds, model_bytes, layer_bytes),
            "rounds": rounds,
        }
        print_table(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
