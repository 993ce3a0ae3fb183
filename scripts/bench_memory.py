"""Peak memory of quantize and verify at 2 and 8 layers of the same width: flat in depth, or not.

Builds two synthetic Mixtral-style checkpoints (random bf16 weights, transformers' own classes) that
differ only in depth, runs `quantize` (GPTQ, few calibration tokens) and `verify` on each in a fresh
process, and reads each process's peak RSS (VmHWM). Streaming by layer means the 8-layer model should
peak where the 2-layer one does, although it is 4x larger. Prints a table and writes JSON.

    python scripts/bench_memory.py --hidden 1024 --out bench_results/memory.json
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
import json, sys, time
import moeconvert
from moeconvert.pipeline import QuantizeOptions
step, source, out = sys.argv[1:4]
t = time.perf_counter()
if step == "quantize":
    moeconvert.quantize(source, moeconvert.Scheme(bits=4, group_size=128), output=out,
                        options=QuantizeOptions(samples=4, seq_len=256), verify=False, progress=False)
else:
    moeconvert.verify(source, out, samples=4, seq_len=256, progress=False)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": int(hwm) * 1024}))
"""


def run_step(step: str, source: Path, out: Path) -> dict:
    env = {"TQDM_DISABLE": "1", "PATH": "", "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", STEP, step, str(source), str(out)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--depths", type=int, nargs=2, default=(2, 8))
    parser.add_argument("--out", type=Path, default=Path("bench_results/memory.json"))
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
