#!/usr/bin/env bash
# The main job on an embedded default: build a tiny Mixtral-style MoE (no download needed), inspect it,
# fuse its experts into the transformers 5 layout, and restore it bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=demo
moeconvert tiny mixtral -o "$out/tiny-mixtral" --force
moeconvert inspect "$out/tiny-mixtral"
moeconvert fuse "$out/tiny-mixtral" -o "$out/tiny-mixtral-fused" --force
moeconvert inspect "$out/tiny-mixtral-fused" --json --report "$out/tiny-mixtral-fused.inspect.json" > /dev/null
moeconvert unfuse "$out/tiny-mixtral-fused" -o "$out/tiny-mixtral-unfused" --force
python - "$out" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
import torch
root = Path(sys.argv[1])
def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
a, b = tensors(root / "tiny-mixtral"), tensors(root / "tiny-mixtral-unfused")
same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
print(f"fuse -> unfuse round trip: {'bit-identical' if same else 'MISMATCH'} ({len(a)} tensors)")
sys.exit(0 if same else 1)
PY
