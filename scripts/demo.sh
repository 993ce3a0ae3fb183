#!/usr/bin/env bash
# The main job on an embedded default: build a tiny Mixtral-style MoE (briefly trained, no download
# needed), inspect it, quantize it to 4 bits with GPTQ (routed calibration on the built-in corpus),
# verify the result against the original, check its manifest, and show the lossless fuse/unfuse round trip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=demo
moeconvert tiny mixtral -o "$out/tiny-mixtral" --force
moeconvert inspect "$out/tiny-mixtral"
# tiny widths (64) need a group size that divides them; real models use the default 128
moeconvert quantize "$out/tiny-mixtral" --bits 4 --group-size 32 --samples 32 --seq-len 256 \
    -o "$out/tiny-mixtral-w4g32-gptq" --force
moeconvert verify "$out/tiny-mixtral" "$out/tiny-mixtral-w4g32-gptq" --samples 4
moeconvert check "$out/tiny-mixtral-w4g32-gptq"   # every file against its SHA256SUMS
moeconvert fuse "$out/tiny-mixtral" -o "$out/tiny-mixtral-fused" --force
moeconvert verify "$out/tiny-mixtral" "$out/tiny-mixtral-fused" --samples 2 --seq-len 64 --json > "$out/fused-parity.json"
moeconvert unfuse "$out/tiny-mixtral-fused" -o "$out/tiny-mixtral-unfused" --force
moeconvert verify "$out/tiny-mixtral" "$out/tiny-mixtral-unfused" --samples 2 --seq-len 64 --json > "$out/unfused-parity.json"
echo "fuse and unfuse: bit-identical (see $out/*-parity.json)"
