"""Benchmark fuse/unfuse against a plain copy of the same files, and their peak memory.

Builds a synthetic Mixtral-style checkpoint (random bf16 weights, transformers' own classes), then
runs each step in a fresh subprocess so that its peak RSS (VmHWM, which a fresh exec resets) is its own. Prints a table and writes JSON.

    python scripts/bench_fuse.py --layers 8 --hidden 1024 --out bench_results/fuse.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import shutil, sys, time
import moeconvert
step, src, dst = sys.argv[1:4]
t = time.perf_counter()
if step == "copy":
    shutil.copytree(src, dst)
else:
    getattr(moeconvert, step)(src, dst, max_shard_size="1GB")
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(time.perf_counter() - t, int(hwm) * 1024)
"""


def run_step(step: str, src: Path, dst: Path) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", STEP, step, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
        env={"TQDM_DISABLE": "1", "PATH": ""},
    )
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def baseline_rss() -> int:
    code = (
        "import moeconvert, moeconvert.relayout, transformers, torch\n"
        "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024)"
    )
    return int(
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench_results/fuse.json"))
    args = parser.parse_args()

    import torch

    from moeconvert.checkpoint import ShardedReader
    from moeconvert.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_fuse_"))
    try:
        src = build_tiny_model(
            "mixtral", work / "src", dtype=torch.bfloat16, max_shard_size="1GB",
            hidden_size=args.hidden, intermediate_size=int(3.5 * args.hidden), num_hidden_layers=args.layers,
            num_local_experts=args.experts, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
        )  # fmt: skip
        with ShardedReader(src) as reader:
            total = reader.total_bytes
            layer = max(
                sum(reader.metas[n].nbytes for n in names) for _, names in reader.layer_names().items()
            )
        rows = []
        for step, source in (("copy", src), ("fuse", src), ("unfuse", work / "fuse")):
            seconds, rss = run_step(step, source, work / step)
            rows.append({"step": step, "seconds": seconds, "peak_rss_bytes": rss})
        base = baseline_rss()
        copy_s = rows[0]["seconds"]
        for row in rows:
            row["vs_copy"] = row["seconds"] / copy_s
            row["rss_over_import"] = row["peak_rss_bytes"] - base
            row["rss_over_import_in_layers"] = row["rss_over_import"] / layer
        result = {
            "model_bytes": total,
            "largest_group_bytes": layer,
            "import_rss_bytes": base,
            "machine": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rows": rows,
        }
        print(
            f"model {total / 1e9:.2f} GB, largest layer {layer / 1e6:.0f} MB, imports alone {base / 1e6:.0f} MB RSS"
        )
        print(f"{'step':<8}{'seconds':>9}{'x copy':>8}{'peak RSS MB':>13}{'over imports, layers':>22}")
        for r in rows:
            print(
                f"{r['step']:<8}{r['seconds']:>9.2f}{r['vs_copy']:>8.2f}{r['peak_rss_bytes'] / 1e6:>13.0f}{r['rss_over_import_in_layers']:>22.2f}"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
