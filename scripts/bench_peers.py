"""moeconvert against llm-compressor and GPTQModel: the same model, the same tokens, one evaluator.

Builds a small trained qwen3_moe checkpoint (hidden 1024, 4 layers of 32 experts of 512, top-4, bf16),
samples the calibration tokens once with moeconvert's own sampler (32 x 256 byte tokens of the shipped
corpus, seed 0) and hands the same ids to every tool, each quantizing GPTQ W4 g128 symmetric in a fresh
process: moeconvert in this environment, each peer in its own virtual environment under
``~/.cache/moeconvert-bench/<peer>`` (created on first use: CPU torch first, then the peer at a pinned
version; the peers are never dependencies of moeconvert). Per tool: wall and CPU time of the whole
process, the quantize call alone, peak RSS (the driver's own VmHWM), and the quality of its
output as measured by ``moeconvert.verify`` against the original: KL(original || quantized), top-1 and
perplexity, on held-out text (the Python documentation topics shipped with the interpreter, which the
model never saw) and on windows of the training corpus (seed 1). A tool that cannot be installed, fails,
or writes an output the evaluator cannot read is reported as such. Prints a Markdown table and the
reading against the target (>= 5x faster than the fastest peer, KL no worse than the best peer's) and
writes JSON (after every tool, so a later failure keeps the earlier results). docs/PERFORMANCE.md,
"Against peers", has the numbers and what they mean.

    python scripts/bench_peers.py --tools moeconvert llm-compressor gptqmodel \
        moeconvert-all-experts llm-compressor-no-actorder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("MOECONVERT_BENCH_CACHE", Path.home() / ".cache" / "moeconvert-bench"))
TORCH = "torch==2.13.0"  # a CPU build (the peers' own requirements would pull a CUDA one)

MODEL = dict(
    hidden_size=1024,
    moe_intermediate_size=512,
    intermediate_size=3072,  # dense MLP width; unused (every layer is sparse) but kept plausible
    num_experts=32,
    num_experts_per_tok=4,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    vocab_size=256,  # byte tokens: the tiny models have no tokenizer
)


@dataclass(frozen=True)
class Peer:
    name: str
    requirements: tuple[str, ...]  # installed after TORCH, with torch held at TORCH
    distribution: str  # whose version is reported
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""


MOECONVERT_SETTINGS = (
    "Scheme(bits=4, group_size=128, sym=True, method='gptq'), format compressed-tensors; library defaults "
    "otherwise: damp 0.01, act-order with static groups, each expert calibrated on the tokens routed to it"
)

# Diagnostic variants, not in the default --tools: each changes one setting in which the tools differ.
DIAGNOSTIC = {
    "moeconvert-all-experts",
    "moeconvert-bf16-forward",
    "moeconvert-4k-pages",
    "llm-compressor-no-actorder",
}
# moeconvert's runs get what its command line sets for itself (moeconvert/cli.py): torch's tensors on
# huge pages. The peers run with their libraries' own settings.
OWN_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
OWN_VARIANT_ENV = {"moeconvert-4k-pages": {"THP_MEM_ALLOC_ENABLE": "0"}}
OWN_VARIANTS = {
    "moeconvert-bf16-forward": "as moeconvert, but forward_dtype='checkpoint': calibration forward passes in "
    "the model's bf16, as the peers run them",
    "moeconvert-all-experts": "as moeconvert, but calibrate_all_experts=True: every expert on every token, "
    "as llm-compressor does by default",
    "moeconvert-4k-pages": "as moeconvert, but THP_MEM_ALLOC_ENABLE=0: torch's tensors on 4 KiB pages, as "
    "before the command line turned huge pages on",
}

PEERS = {
    "llm-compressor": Peer(
        "llm-compressor",
        ("llmcompressor==0.14.0.1",),  # pins transformers<=5.17 and compressed-tensors==0.19
        "llmcompressor",
        note="GPTQModifier(targets='Linear', scheme='W4A16', ignore=[lm_head, mlp.gate]); library defaults "
        "otherwise: actorder static, dampening 0.01, every expert calibrated on every token",
    ),
    "llm-compressor-no-actorder": Peer(  # a diagnostic variant, in the same environment
        "llm-compressor",
        ("llmcompressor==0.14.0.1",),
        "llmcompressor",
        note="as llm-compressor, but GPTQModifier(actorder=None): columns in their natural order",
    ),
    "gptqmodel": Peer(
        "gptqmodel",
        ("gptqmodel==7.6.0",),  # 7.7 requires torch>=2.14.1, of which only a CUDA build is at hand here
        "gptqmodel",
        env={"GPTQMODEL_CPU_WORKERS": "2"},
        note="QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False); library defaults otherwise: "
        "damp 0.05, group-aware reordering, RTN for modules that saw under 0.5% of the tokens",
    ),
}


# ------------------------------------------------------------------------------------------------ drivers
# Each runs in a fresh process: argv = source, output, calibration JSON, threads. It prints a line
# "BENCH_RESULT {json}" with "version", "quantize_seconds" (from the model load to the written output) and
# "peak_rss" (PEAK_RSS below).

# The process's own high-water mark, not wait4's ru_maxrss: a child spawned by a large parent starts with
# the parent's resident set on its account (vfork shares the parent's memory until exec, and exec keeps
# the larger mark), so wait4 reported this script's own 1.5-1.9 GB for any tool that peaked lower.
# VmHWM starts afresh at exec; the ru_maxrss of the driver's own children (worker processes) is bounded
# by the driver's mark at their spawn, so the larger of the two is the largest process of the run.
PEAK_RSS = r"""
import resource
def peak_rss():
    own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
"""

MOECONVERT_DRIVER = r"""
import json, sys, time
import torch
import moeconvert
from moeconvert.pipeline import QuantizeOptions
src, out, calib, threads = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
torch.set_num_threads(threads)
samples, seq_len = len(calib["input_ids"]), len(calib["input_ids"][0])
t = time.perf_counter()
report = moeconvert.quantize(
    src, moeconvert.Scheme(bits=4, group_size=128, sym=True, method="gptq"), output=out,
    options=QuantizeOptions(format="compressed-tensors", samples=samples, seq_len=seq_len, seed=calib["seed"],
                            device="cpu", calibrate_all_experts=ALL_EXPERTS, forward_dtype=FORWARD),
    verify=False, progress=False,
)
seconds = time.perf_counter() - t
if report.calibration["tokens_sha256"] != calib["sha256"]:
    sys.exit("moeconvert sampled other calibration tokens than the ones handed to the peers")
print("BENCH_RESULT", json.dumps({"version": moeconvert.__version__, "quantize_seconds": seconds,
                                     "peak_rss": peak_rss()}))
"""

LLMCOMPRESSOR_DRIVER = r"""
import json, sys, time
import torch
src, out, calib, threads = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
torch.set_num_threads(threads)
from datasets import Dataset
from transformers import AutoModelForCausalLM
import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
ids = calib["input_ids"]
t = time.perf_counter()
# Loaded plainly (experts fused to 3-D), oneshot linearizes them itself: the documented fallback. Its faster
# path, `with load_quantizable_moe():`, makes transformers 5.17 walk every module alias it has imported,
# and its image-processor aliases import torchvision, of which PyPI has no build for a CPU torch.
model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"], **OPTIONS)
oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=len(ids[0]),
        num_calibration_samples=len(ids))
model.save_pretrained(out, save_compressed=True)
seconds = time.perf_counter() - t
print("BENCH_RESULT", json.dumps({"version": llmcompressor.__version__, "quantize_seconds": seconds,
                                     "peak_rss": peak_rss()}))
"""

GPTQMODEL_DRIVER = r"""
import json, sys, time
import torch
src, out, calib, threads = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
torch.set_num_threads(threads)
import gptqmodel
from gptqmodel import GPTQModel, QuantizeConfig
ids = calib["input_ids"]
t = time.perf_counter()
config = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False)
model = GPTQModel.load(src, config, device="cpu")
rows = [{"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)} for row in ids]
model.quantize(rows, batch_size=1)
model.save(out)
seconds = time.perf_counter() - t
print("BENCH_RESULT", json.dumps({"version": gptqmodel.__version__, "quantize_seconds": seconds,
                                     "peak_rss": peak_rss()}))
"""

DRIVERS = {
    "moeconvert": "ALL_EXPERTS, FORWARD = False, 'float32'\n" + PEAK_RSS + MOECONVERT_DRIVER,
    "moeconvert-all-experts": "ALL_EXPERTS, FORWARD = True, 'float32'\n" + PEAK_RSS + MOECONVERT_DRIVER,
    "moeconvert-bf16-forward": "ALL_EXPERTS, FORWARD = False, 'checkpoint'\n" + PEAK_RSS + MOECONVERT_DRIVER,
    "moeconvert-4k-pages": "ALL_EXPERTS, FORWARD = False, 'float32'\n" + PEAK_RSS + MOECONVERT_DRIVER,
    "llm-compressor": "OPTIONS = {}\n" + PEAK_RSS + LLMCOMPRESSOR_DRIVER,
    "llm-compressor-no-actorder": "OPTIONS = {'actorder': None}\n" + PEAK_RSS + LLMCOMPRESSOR_DRIVER,
    "gptqmodel": PEAK_RSS + GPTQMODEL_DRIVER,
}


# ------------------------------------------------------------------------------------------- environments


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def peer_python(peer: Peer, cache: Path, log: Any) -> tuple[Path, dict[str, str]]:
    """The peer's interpreter, creating its environment if missing; and the versions installed there.

    Raises:
        RuntimeError: the environment could not be created or the peer not installed (with pip's words).
    """
    home = cache / peer.name
    python, ready = home / "bin" / "python", home / "ready.json"
    wanted = {"requirements": [TORCH, *peer.requirements], "python": platform.python_version()}
    if ready.is_file() and json.loads(ready.read_text()).get("wanted") == wanted and python.exists():
        return python, json.loads(ready.read_text())["versions"]
    shutil.rmtree(home, ignore_errors=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    install_log = cache / f"{peer.name}-install.log"
    constraints = cache / f"{peer.name}-constraints.txt"
    constraints.write_text(TORCH + "\n")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [
        [base, "-m", "venv", str(home)],
        [str(python), "-m", "pip", "install", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", TORCH],
        [str(python), "-m", "pip", "install", "-c", str(constraints), *peer.requirements],
    ]
    with install_log.open("w") as out:
        for step in steps:
            print(f"[{peer.name}] {' '.join(step)}", file=log, flush=True)
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(
                    f"installing {peer.name} failed at `{' '.join(step[2:])}` (log: {install_log}):\n"
                    + _tail(install_log)
                )
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(found))\n"
    )
    names = [peer.distribution, "torch", "transformers", "compressed-tensors", "accelerate", "datasets"]
    result = subprocess.run([str(python), "-c", probe, *names], capture_output=True, text=True, check=True)
    versions = json.loads(result.stdout)
    ready.write_text(json.dumps({"wanted": wanted, "versions": versions}, indent=2) + "\n")
    return python, versions


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Run:
    tool: str
    status: str = "not run"  # ok | install failed | quantize failed | evaluation failed
    error: str = ""
    log_tail: str = ""
    version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    settings: str = ""
    wall_seconds: float | None = None  # the whole process: imports, load, calibration, solve, save
    quantize_seconds: float | None = None  # from the model load to the written output
    cpu_seconds: float | None = None  # user + system time of the process: less sensitive to other users
    peak_rss: int | None = None  # bytes, the driver's high-water mark (or its largest child's)
    load_before: float | None = None  # 1-minute load average when it started (other users of the cores)
    load_after: float | None = None  # and when it ended (its own threads included)
    output_bytes: int | None = None
    checkpoint_format: str = ""
    held_out: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # moeconvert's own per-layer report


# What each tool's driver imports: imported once, untimed, before its run.
WARM_UP = {"moeconvert": "moeconvert", "llm-compressor": "llmcompressor", "gptqmodel": "gptqmodel"}


def warm_up(python: Path, tool: str, env: dict[str, str]) -> None:
    """Import the tool and the model's transformers classes once in its environment, untimed.

    A run right after its environment was created is a cold start: bytecode compiled, libraries read
    from disk. GPTQModel's first run after install took 68.5 s here, its next ones 38.6-40.8 s (50.2 s
    with its bytecode deleted). One import brings each tool to the state of a user's second run."""
    package = WARM_UP[next(name for name in WARM_UP if tool.startswith(name))]
    code = f"import {package}, transformers.models.qwen3_moe.modeling_qwen3_moe"
    subprocess.run([str(python), "-c", code], env=env, capture_output=True, check=False)


def run_tool(
    python: Path,
    tool: str,
    src: Path,
    out: Path,
    calib: Path,
    threads: int,
    env: dict[str, str],
    log_path: Path,
    timeout: float,
) -> Run:
    """Quantize SRC into OUT with TOOL's driver in a fresh process; wall and CPU time from wait4.

    A driver still running after ``timeout`` seconds is killed and reported as failed."""
    run = Run(tool)
    shutil.rmtree(out, ignore_errors=True)
    driver = log_path.parent / "drivers" / f"drive_{tool.replace('-', '_')}.py"  # not a package's name
    driver.parent.mkdir(exist_ok=True)
    driver.write_text(DRIVERS[tool])
    child_env = {
        **{k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "LANG", "TMPDIR", "USER")},
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    warm_up(python, tool, child_env)
    run.load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(python), str(driver), str(src), str(out), str(calib), str(threads)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=driver.parent,
        )  # fmt: skip
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timed_out = not timer.is_alive()
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    run.wall_seconds = time.perf_counter() - started
    run.load_after = os.getloadavg()[0]
    run.cpu_seconds = usage.ru_utime + usage.ru_stime
    found = re.findall(r"BENCH_RESULT (\{[^{}]*\})", log_path.read_text(errors="replace"))
    if proc.returncode != 0 or not found:
        run.status = "quantize failed"
        run.log_tail = _tail(log_path)
        last_words = [line for line in run.log_tail.splitlines() if line.strip()][-1:] or ["no output"]
        reason = f"killed after {timeout:.0f} s" if timed_out else last_words[0].strip()
        run.error = f"{reason} (exit code {proc.returncode}; log: {log_path})"
        return run
    result = json.loads(found[-1])
    run.version, run.quantize_seconds = result["version"], result["quantize_seconds"]
    run.peak_rss = result["peak_rss"]
    run.output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    quant = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    run.checkpoint_format = "/".join(
        str(x) for x in (quant.get("quant_method"), quant.get("format"), quant.get("checkpoint_format")) if x
    )
    report = out / "quantization_report.json"
    if report.is_file():  # seconds per layer, and how unevenly the router spread the calibration tokens
        run.layers = [
            {
                "layer": layer["layer"],
                "seconds": layer["seconds"],
                "tokens_per_expert_max": max(layer["tokens_per_expert"], default=0),
                "experts_below_min_tokens": len(layer["starved_experts"]),
            }
            for layer in json.loads(report.read_text())["layers"]
        ]
    run.status = "ok"
    return run


def evaluate(run: Run, src: Path, out: Path, held_out: Path, samples: int, seq_len: int, seed: int) -> None:
    """KL, top-1 and perplexity of OUT against SRC with moeconvert.verify: held-out text and corpus windows."""
    import moeconvert

    try:
        for key, calib in (("held_out", str(held_out)), ("corpus", None)):
            report = moeconvert.verify(
                str(src), str(out), device="cpu", calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                progress=False,
            )  # fmt: skip
            setattr(run, key, {
                "kl_mean": report.kl_mean,
                "kl_max": report.kl_max,
                "kl_median": report.kl_median,
                "kl_p99": report.kl_p99,
                "top1_agreement": report.top1_agreement,
                "perplexity_original": report.perplexity_original,
                "perplexity_converted": report.perplexity_converted,
                "layer_errors": [p.layer_error for p in report.layers],
                "tokens": report.tokens,
                "failures": report.failures,
            })  # fmt: skip
    except Exception as err:  # noqa: BLE001 - an unreadable output is a result, not a crash
        run.status = "evaluation failed"
        run.error = f"moeconvert.verify could not read the output: {type(err).__name__}: {err}"
        run.log_tail = "".join(traceback.format_exception(err)[-6:])


# ------------------------------------------------------------------------------------------------- inputs


def build_model(work: Path, train_steps: int, log: Any) -> tuple[Path, dict[str, Any]]:
    """The trained bf16 checkpoint, built once per settings (in a fresh process, freeing the optimizer)."""
    src = work / "model"
    settings = {
        "family": "qwen3_moe",
        "train_steps": train_steps,
        "dtype": "bfloat16",
        **MODEL,
    }
    stamp = work / "model.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings and src.is_dir():
        return src, json.loads(stamp.read_text())
    shutil.rmtree(src, ignore_errors=True)
    code = (
        "import json, sys, time, torch\n"
        "from moeconvert.tiny import build_tiny_model\n"
        "s = json.loads(sys.argv[2]); t = time.perf_counter()\n"
        "build_tiny_model('qwen3_moe', sys.argv[1], train_steps=s.pop('train_steps'), dtype=torch.bfloat16,\n"
        "                 **{k: v for k, v in s.items() if k not in ('family', 'dtype')})\n"
        "print(time.perf_counter() - t)\n"
    )
    print(f"building the model ({train_steps} training steps) ...", file=log, flush=True)
    result = subprocess.run(
        [sys.executable, "-c", code, str(src), json.dumps(settings)], capture_output=True, text=True
    )
    if result.returncode:
        raise SystemExit(f"building the model failed:\n{result.stderr[-3000:]}")
    info = {"settings": settings, "build_seconds": float(result.stdout.strip().splitlines()[-1])}
    info["bytes"] = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return src, info


def calibration_file(src: Path, work: Path, samples: int, seq_len: int, seed: int) -> tuple[Path, str]:
    """The token ids every tool calibrates on, as moeconvert samples them, written as JSON."""
    from moeconvert.quant.calibration import calibration_tokens, tokens_digest

    tokens = calibration_tokens(None, src, MODEL["vocab_size"], samples, seq_len, seed)
    digest = tokens_digest(tokens)
    path = work / "calibration.json"
    path.write_text(json.dumps({"seed": seed, "sha256": digest, "input_ids": tokens.tolist()}))
    return path, digest


def held_out_text(work: Path) -> tuple[Path, str]:
    """English prose and code the model never saw: the interpreter's own documentation topics."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    path = work / "held_out.txt"
    path.write_text(text, encoding="utf-8")
    return path, hashlib.sha256(text.encode()).hexdigest()


def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def print_table(runs: list[Run]) -> None:
    """A Markdown table of the runs, and the reading against the target (>= 5x faster, KL no worse)."""
    base = next((r for r in runs if r.tool == "moeconvert" and r.status == "ok"), None)
    print("| tool | version | wall s | CPU s | quantize s | peak RSS | KL held-out | top-1 held-out "
          "| ppl held-out (orig → quant) | KL corpus | wall / moeconvert's |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        if run.status != "ok":
            print(f"| {run.tool} | {run.version} | {run.status.upper()}: {run.error[:120]} |||||||||")
            continue
        h, c = run.held_out, run.corpus
        ratio = f"{run.wall_seconds / base.wall_seconds:.2f}" if base else "-"
        print(
            f"| {run.tool} | {run.version} | {run.wall_seconds:.1f} | {run.cpu_seconds:.1f} | "
            f"{run.quantize_seconds:.1f} | {run.peak_rss / 1e9:.2f} GB | {h['kl_mean']:.2e} | "
            f"{h['top1_agreement']:.4f} | {h['perplexity_original']:.3f} → {h['perplexity_converted']:.3f} | "
            f"{c['kl_mean']:.2e} | {ratio} |"
        )
    peers = [r for r in runs if r.tool in PEERS and r.tool not in DIAGNOSTIC and r.status == "ok"]
    if base and peers:
        fastest = min(peers, key=lambda r: r.wall_seconds)
        best = min(peers, key=lambda r: r.held_out["kl_mean"])
        speedup = fastest.wall_seconds / base.wall_seconds
        print(
            f"\ntarget >= 5x faster than the fastest peer ({fastest.tool}): {speedup:.2f}x "
            f"({'met' if speedup >= 5 else 'not met'}); KL held-out no worse than the best peer's "
            f"({best.tool}, {best.held_out['kl_mean']:.2e}): moeconvert {base.held_out['kl_mean']:.2e} "
            f"({'met' if base.held_out['kl_mean'] <= best.held_out['kl_mean'] else 'not met'})"
        )


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tools",
        nargs="+",
        default=["moeconvert", *(p for p in PEERS if p not in DIAGNOSTIC)],
        choices=["moeconvert", *OWN_VARIANTS, *PEERS],
        help=f"default: moeconvert and the peers; diagnostic variants: {', '.join(sorted(DIAGNOSTIC))}",
    )
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5400, help="seconds one tool may take")
    parser.add_argument("--cache", type=Path, default=CACHE, help="peer environments and the work folder")
    parser.add_argument("--setup-only", action="store_true", help="create the peer environments and stop")
    parser.add_argument("--out", type=Path, default=Path("bench_results/peers.json"))
    args = parser.parse_args()
    log = sys.stdout

    work = args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Run] = {}
    pythons: dict[str, Path] = {}
    for tool in args.tools:
        if tool not in PEERS:
            continue
        try:
            pythons[tool], versions = peer_python(PEERS[tool], args.cache, log)
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            runs[tool] = Run(tool, status="install failed", error=str(err), settings=PEERS[tool].note)
            print(f"[{tool}] INSTALL FAILED: {err}", file=log, flush=True)
            continue
        runs[tool] = Run(tool, versions=versions, version=versions.get(PEERS[tool].distribution, ""))
        print(f"[{tool}] environment ready: {versions}", file=log, flush=True)
    if args.setup_only:
        return

    import torch
    import transformers

    import moeconvert

    own_versions = {"moeconvert": moeconvert.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__}  # fmt: skip
    src, model_info = build_model(work, args.train_steps, log)
    calib, digest = calibration_file(src, work, args.samples, args.seq_len, seed=0)
    held_out, held_out_digest = held_out_text(work)
    for tool in args.tools:
        if tool in runs and runs[tool].status == "install failed":
            continue
        python = pythons[tool] if tool in PEERS else Path(sys.executable)
        env = PEERS[tool].env if tool in PEERS else OWN_VARIANT_ENV.get(tool, OWN_ENV)
        print(f"[{tool}] quantizing ...", file=log, flush=True)
        run = run_tool(
            python,
            tool,
            src,
            work / f"out-{tool}",
            calib,
            args.threads,
            env,
            work / f"{tool}.log",
            args.timeout,
        )
        if tool in runs:  # what its environment holds, even when it failed before printing its version
            run.versions, run.version = runs[tool].versions, run.version or runs[tool].version
        else:
            run.versions = own_versions
        run.settings = PEERS[tool].note if tool in PEERS else OWN_VARIANTS.get(tool, MOECONVERT_SETTINGS)
        runs[tool] = run
        if run.status != "ok":
            print(f"[{tool}] FAILED: {run.error}\n{run.log_tail}", file=log, flush=True)
            continue
        print(
            f"[{tool}] {run.wall_seconds:.1f} s, peak {run.peak_rss / 1e9:.2f} GB; evaluating ...",
            file=log,
            flush=True,
        )
        evaluate(run, src, work / f"out-{tool}", held_out, args.eval_samples, args.seq_len, seed=1)
        if run.status != "ok":
            print(f"[{tool}] FAILED: {run.error}\n{run.log_tail}", file=log, flush=True)
        write_results(args, model_info, digest, held_out_digest, runs)  # a later failure keeps these

    print()
    print_table([runs[tool] for tool in args.tools if tool in runs])
    write_results(args, model_info, digest, held_out_digest, runs)
    print(f"\nwrote {args.out}")


def write_results(
    args: argparse.Namespace,
    model_info: dict[str, Any],
    digest: str,
    held_out_digest: str,
    runs: dict[str, Run],
) -> None:
    result = {
        "machine": machine(),
        "threads": args.threads,
        "model": model_info,
        "calibration": {"source": "moeconvert built-in corpus", "samples": args.samples, "seq_len": args.seq_len,
                        "seed": 0, "tokens_sha256": digest},
        "evaluation": {"by": "moeconvert.verify", "samples": args.eval_samples, "seq_len": args.seq_len, "seed": 1,
                       "held_out": {"text": "pydoc_data.topics of Python " + platform.python_version(),
                                    "sha256": held_out_digest},
                       "corpus": "moeconvert built-in corpus (the calibration and training text)"},
        "runs": [asdict(runs[tool]) for tool in args.tools if tool in runs],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
