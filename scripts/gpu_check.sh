#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, on a machine whose Python already has the project's
# dependencies (a GPU build of torch among them): the GPTQ layer benchmark on CUDA at full calibration,
# one Qwen3-30B-A3B-width layer through the whole quantize pipeline on CUDA, and the test suite with
# CUDA present (its "auto" devices then pick the GPU). Each step has its own time limit and a failing
# step does not stop the others; logs and JSON go to the results folder.
#
#   bash scripts/gpu_check.sh [results-folder] [steps...]
# steps: layer e2e tests presets (the default), and chunks (Hessian chunk sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-bench_results/cuda}
shift || true
steps=${*:-layer e2e tests presets}
mkdir -p "$results"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout, installed or not
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
status=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > >(tee "$results/$name.log") 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi -L || true
$py -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, torch.cuda.get_device_name())'

for s in $steps; do
    case $s in
    layer)  # the issue's CUDA goal: a Qwen3-30B-A3B-shaped layer at 128 x 2048 tokens in <= 12 s
        step bench_quantize_qwen3 ${LAYER_LIMIT:-100} $py scripts/bench_quantize.py --device cuda \
            --preset qwen3-30b-a3b --loop-experts 16 --out "$results/quantize-qwen3-cuda.json" \
            --write-dir /tmp/moeconvert-bench ;;
    e2e)  # the same width through `quantize` itself: read, calibrate, solve, pack, write, on CUDA
        step e2e_qwen3_layer ${E2E_LIMIT:-120} $py scripts/bench_memory.py --qwen3-30b-layer \
            --samples 128 --seq-len 2048 --out "$results/e2e-qwen3-layer-cuda.json" ;;
    tests)  # in parallel where pytest-xdist is installed, the cores shared out among the workers;
        # -v names each result as it comes, so a run cut short by its limit still says what failed
        workers=() threads=$OMP_NUM_THREADS limit=1500  # about 11 minutes on 2 cores, one process
        if $py -c 'import xdist' 2>/dev/null; then
            n=${TEST_WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
            workers=(-n "$n") threads=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 )) limit=300
        fi
        OMP_NUM_THREADS=$threads step tests ${TESTS_LIMIT:-$limit} $py -m pytest -v -p no:cacheprovider \
            "${workers[@]}" -rfE --tb=short ;;
    chunks)  # the Hessian products at larger chunks than the pipeline's 512 rows (not a default step)
        for rows in 2048 8192; do
            step bench_quantize_chunks_$rows ${LAYER_LIMIT:-100} $py scripts/bench_quantize.py --device cuda \
                --preset qwen3-30b-a3b --loop-experts 2 --hessian-chunk-rows $rows \
                --out "$results/quantize-qwen3-cuda-chunks-$rows.json" --write-dir /tmp/moeconvert-bench
        done ;;
    presets)
        step bench_quantize_mixtral ${PRESETS_LIMIT:-150} $py scripts/bench_quantize.py --device cuda \
            --preset mixtral --loop-experts 8 --out "$results/quantize-mixtral-cuda.json" \
            --write-dir /tmp/moeconvert-bench
        step bench_quantize_deepseek ${PRESETS_LIMIT:-150} $py scripts/bench_quantize.py --device cuda \
            --preset deepseek-v2-lite --loop-experts 16 --out "$results/quantize-deepseek-cuda.json" \
            --write-dir /tmp/moeconvert-bench ;;
    *) echo "unknown step: $s" >&2; status=2 ;;
    esac
done
exit $status
