"""Expert-parallel quantize: 1 rank against N ranks (gloo, this machine) on a Qwen3-30B-A3B-shaped layer.

Builds a one-layer qwen3_moe checkpoint at Qwen3-30B-A3B's widths (hidden 2048, 128 experts of 768,
top-8, 32 query / 4 key-value heads of 128; small vocabulary; random bf16 weights), then times
`moeconvert quantize` (GPTQ w4 g128) with 1 rank and with `--nproc-per-node N`, every rank on one thread.
Reports wall time, the layer's own time, the bytes each rank received in the all-gathers (from the shapes:
every rank receives the other ranks' hook inputs), and checks the two outputs are byte-identical.
Prints a table and writes JSON.

    python scripts/bench_distributed.py --ranks 2 --samples 8 --seq-len 512 --out bench_results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_30B_A3B = {
    "hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144, "num_experts": 128,
    "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_hidden_layers": 1, "vocab_size": 1024, "decoder_sparse_step": 1, "mlp_only_layers": [],
}  # fmt: skip


def quantize(source: Path, out: Path, ranks: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "moeconvert", "quantize", str(source), "-o", str(out), "--bits", "4",
        "--group-size", "128", "--samples", str(args.samples), "--seq-len", str(args.seq_len),
        "--batch-tokens", str(args.batch_tokens), "--no-verify", "--json", "--nproc-per-node", str(ranks),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    report = json.loads(result.stdout[result.stdout.index("{") :])
    return {"ranks": ranks, "wall_seconds": wall, "layer_seconds": report["layers"][0]["seconds"]}


def gathered_bytes_per_rank(tokens: int, ranks: int) -> int:
    """Bytes one rank receives per MoE layer: the other ranks' share of every distinct hook input (float32):
    attention input (shared by q, k, v), o_proj input, experts input plus its routing mask (one byte)."""
    c = QWEN3_30B_A3B
    per_token = (
        4 * (c["hidden_size"] + c["num_attention_heads"] * c["head_dim"] + c["hidden_size"])
        + c["num_experts"]
    )
    return tokens * per_token * (ranks - 1) // ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("bench_results/distributed.json"))
    args = parser.parse_args()

    import torch

    from moeconvert.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        source = build_tiny_model("qwen3_moe", work / "src", dtype=torch.bfloat16, **QWEN3_30B_A3B)
        rows = [quantize(source, work / f"out{n}" / "q", n, args) for n in (1, args.ranks)]
        same = (work / "out1" / "q" / "model.safetensors").read_bytes() == (
            work / f"out{args.ranks}" / "q" / "model.safetensors"
        ).read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = args.samples * args.seq_len
    for row in rows:
        row["gathered_bytes_per_rank"] = gathered_bytes_per_rank(tokens, row["ranks"])
    result = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "shape": QWEN3_30B_A3B,
        "tokens": tokens,
        "identical_weights": same,
        "rows": rows,
    }
    print(f"{'ranks':>5}{'wall s':>9}{'layer s':>9}{'layer speed-up':>16}{'gathered MB/rank':>18}")
    for row in rows:
        print(
            f"{row['ranks']:>5}{row['wall_seconds']:>9.1f}{row['layer_seconds']:>9.1f}"
            f"{rows[0]['layer_seconds'] / row['layer_seconds']:>16.2f}{row['gathered_bytes_per_rank'] / 1e6:>18.1f}"
        )
    print(f"tokens {tokens}; weights byte-identical across rank counts: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
