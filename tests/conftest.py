"""Shared fixtures: tiny models of every family, built once per test session with transformers."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeconvert.checkpoint import layer_index, layer_prefix
from moeconvert.families import family_for, is_stack_name, load_config
from moeconvert.layout import unstack_experts
from moeconvert.pipeline import QuantizeOptions, quantize
from moeconvert.quant.packing import unpack_compressed
from moeconvert.quant.scheme import Scheme
from moeconvert.relayout import fuse_layer, runtime_layer
from moeconvert.source import read_config
from moeconvert.tiny import TINY_CONFIGS, auto_class, build_tiny_model

# families whose releases are in transformers' runtime layout (Granite SWA's) have tests of their own
# (test_runtime_releases.py): every other test starts from an original layout that fuse turns into it
RUNTIME_RELEASES = sorted(f for f in TINY_CONFIGS if family_for({"model_type": f}).runtime_releases)
FAMILIES = sorted(set(TINY_CONFIGS) - set(RUNTIME_RELEASES))
# families whose releases ship multi-token-prediction modules (see with_mtp)
MTP_FAMILIES = (
    "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4v_moe", "glm_moe_dsa", "qwen3_next", "ernie4_5_moe", "exaone_moe"
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder with a tiny random model in its original per-expert layout (sharded)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        family: build_tiny_model(family, root / family, seed=7, max_shard_size="300KB") for family in FAMILIES
    }


@pytest.fixture(scope="session")
def transformers_fused(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """family -> what transformers itself writes with save_pretrained(save_original_format=False)."""
    root = tmp_path_factory.mktemp("reference_fused")
    out = {}
    for family, folder in tiny_models.items():
        model = auto_class(family).from_pretrained(folder)
        model.save_pretrained(root / family, save_original_format=False)
        out[family] = root / family
    return out


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a folder (tests only: tiny models)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(str(folder / "*.safetensors"))):
        part = load_file(file)
        assert not set(part) & set(tensors), "duplicate tensor across shards"
        tensors.update(part)
    return tensors


def dequantized_state(folder: Path, source: Path) -> dict[str, torch.Tensor]:
    """The model of a compressed-tensors output as our own decoding of its files gives it (bits and groups
    read off the stored shapes, not the config; each weight in its scales' dtype, the source's), in
    transformers' runtime layout (fused experts), whatever layout ``source`` stores its experts in."""
    tensors = load_tensors(folder)
    packed = {n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed")}
    state = {n: t for n, t in tensors.items() if n.rpartition(".weight_")[0] not in packed}
    for module in packed:
        parts = {k[len(module) + 1 :]: v for k, v in tensors.items() if k.startswith(module + ".weight_")}
        bits = parts["weight_packed"].shape[1] * 32 // int(parts["weight_shape"][1])
        qw = unpack_compressed(parts, bits, sym="weight_zero_point" not in parts)
        state[module + ".weight"] = qw.dequantize().to(parts["weight_scale"].dtype)
    raw = read_config(source)
    family, cfg = family_for(raw), load_config(raw)
    fused: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_hidden_layers):
        fused.update(
            fuse_layer(family, cfg, layer, {n: t for n, t in state.items() if layer_index(n) == layer})
        )
    if family.runtime_transposed:  # transformers' module holds Llama 4's stacks transposed
        fused = {n: t.transpose(1, 2) if is_stack_name(n) else t for n, t in fused.items()}
    if cfg.tie_word_embeddings:  # the head is the embedding table, stored once
        state["lm_head.weight"] = next(t for n, t in state.items() if n.endswith("embed_tokens.weight"))
    state = {**{n: t for n, t in state.items() if layer_index(n) is None}, **fused}
    return {runtime_root(n): t for n, t in state.items()}


def runtime_root(name: str) -> str:
    """A checkpoint name as transformers' model holds it: Nemotron-H's releases call the text model
    ``backbone.``, which transformers renames ``model.`` as it loads them."""
    return "model." + name.removeprefix("backbone.") if name.startswith("backbone.") else name


def load_quantized(folder: Path, source: Path) -> torch.nn.Module:
    """transformers' model of a compressed-tensors output of ``source``. transformers reads Qwen3-VL-MoE's
    experts only stacked, not per expert as vLLM does and as the output stores them: for it, the
    source's model with our own decoding of the files (``dequantized_state``)."""
    if family_for(read_config(source)).transformers_reads_per_expert:
        return load_model(folder)
    model = load_model(source)
    model.load_state_dict(dequantized_state(folder, source), strict=True)
    return model


def load_model(folder: Path, experts_implementation: str | None = None) -> torch.nn.Module:
    """Load with transformers (the checkpoint's own model: a vision-language one keeps its vision
    encoder, as serving it does), then give every parameter fresh memory.

    Tensors mapped from a file sit at whatever alignment the file gives them, and some CPU kernels
    take a different (equally valid) path for unaligned data, which can move a logit by one ulp.
    Fresh allocations make logit comparisons about values, not addresses. ``experts_implementation``:
    transformers' routed-experts kernel (its default otherwise); ``eager`` and ``grouped_mm`` sum in
    different orders on some CPUs (one ulp apart on an AMD EPYC, equal on an Intel Xeon).
    """
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = auto_class(read_config(folder)["model_type"]).from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, static: bool = False) -> list:
    """Record the arguments of every call to ``owner.name`` (which still runs) in the returned list."""
    original = getattr(owner, name)
    calls: list = []

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, staticmethod(recorded) if static else recorded)
    return calls


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the real ``moeconvert`` entry point in a subprocess, as a user would."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moeconvert.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


def invoke_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the ``moeconvert`` command line in this process (click's runner), for the many cases that
    exercise a command's checks rather than its start-up: a fresh process spends seconds importing torch
    and transformers. An uncaught exception is written to stderr as a process would print it, so a
    test asserting that no traceback appears still sees it. The environment is restored afterwards.
    Start-up, environment variables, signals and the Hub client's settings need :func:`run_cli`."""
    from unittest import mock

    import tqdm
    from click.testing import CliRunner

    from moeconvert.cli import main

    def quiet(bar: tqdm.tqdm, *bar_args: Any, **kwargs: Any) -> None:  # as TQDM_DISABLE=1 does for run_cli
        kwargs.setdefault("disable", True)
        drawn(bar, *bar_args, **kwargs)

    saved, drawn = dict(os.environ), tqdm.tqdm.__init__
    try:
        with mock.patch.object(tqdm.tqdm, "__init__", quiet), contextlib.chdir(cwd or Path.cwd()):
            result = CliRunner().invoke(main, list(args), prog_name="moeconvert")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["moeconvert", *args], result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> tiny model briefly trained on the shipped corpus: peaked outputs that show damage."""
    root = tmp_path_factory.mktemp("trained")
    return {family: build_tiny_model(family, root / family, seed=3, train_steps=150) for family in FAMILIES}


def eval_tokens(batch: int = 8, seq_len: int = 96) -> torch.Tensor:
    from moeconvert.quant.calibration import calibration_tokens

    return calibration_tokens(None, None, 256, batch, seq_len, seed=777)


def token_kl(reference: torch.nn.Module, candidate: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token KL(reference || candidate) of next-token distributions, flattened."""
    with torch.no_grad():
        p = reference(tokens).logits.float().log_softmax(-1)
        q = candidate(tokens).logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).flatten()


def mean_kl(reference: torch.nn.Module, candidate: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Mean per-token KL(reference || candidate) of next-token distributions."""
    return float(token_kl(reference, candidate, tokens).mean())


W4 = Scheme(bits=4, group_size=32)
W8 = Scheme(bits=8, group_size=32)


@pytest.fixture(scope="session")
def quantized(
    trained_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """(family, variant) -> output folder, for variants w4 gptq, w8 gptq and w4 rtn."""
    root = tmp_path_factory.mktemp("quantized")
    variants = {"w4": W4, "w8": W8, "w4rtn": Scheme(bits=4, group_size=32, method="rtn")}
    out = {}
    for family in FAMILIES:
        for label, scheme in variants.items():
            out[family, label] = root / f"{family}-{label}"
            quantize(
                str(trained_models[family]),
                scheme,
                output=out[family, label],
                options=QuantizeOptions(samples=16, seq_len=128),
                verify=False,
                progress=False,
            )
    return out


MTP_NORMS = ("enorm", "hnorm", "shared_head.norm")


def with_mtp_layer(source: Path, folder: Path) -> Path:
    """``source`` (a DeepSeek-V3 or GLM) with one MTP layer after its last, as they ship it."""
    config = json.loads((source / "config.json").read_text())
    text = config.get("text_config", config)  # GLM-4.5V: the text model's, under model.language_model.
    _with_mtp(source, folder, _layer_stem(source) + f"{text['num_hidden_layers']}.", "eh_proj", MTP_NORMS)
    text["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _layer_stem(source: Path) -> str:
    """``model.layers.`` or, in a vision-language checkpoint, ``model.language_model.layers.``."""
    name = next(n for n in load_tensors(source) if layer_index(n) is not None)
    return layer_prefix(name).removesuffix(f"{layer_index(name)}.")


def with_mtp_block(source: Path, folder: Path) -> Path:
    """``source`` (a Qwen3-Next) with the MTP block Qwen3-Next ships beside the model, ``mtp.*``."""
    norms = ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden")
    return _with_mtp(source, folder, "mtp.", "fc", norms, layer="mtp.layers.0.")


def with_mtp(family: str, source: Path, folder: Path) -> tuple[Path, str, str]:
    """``source`` with the MTP modules ``family`` ships, at ``folder``; the prefixes of its MTP decoder
    layer and of all its MTP modules."""
    if family in ("qwen3_next", "exaone_moe"):  # K-EXAONE's block beside the model is named alike
        return with_mtp_block(source, folder), "mtp.layers.0.", "mtp."
    if family == "ernie4_5_moe":
        return with_ernie_mtp(source, folder), "model.mtp_block.0.", "model.mtp_"
    folder = with_mtp_layer(source, folder)
    layer = next(layer_prefix(n) for n in load_tensors(folder) if n.endswith(".eh_proj.weight"))
    return folder, layer, layer


def with_ernie_mtp(source: Path, folder: Path) -> Path:
    """``source`` (an ERNIE-4.5) with the MTP modules ERNIE ships inside ``model``: ``model.mtp_block.0``,
    ``model.mtp_linear_proj.0`` and two norms."""
    norms = ("emb_norm.0", "hidden_norm.0")
    _with_mtp(source, folder, "model.mtp_", "linear_proj.0", norms, layer="model.mtp_block.0.")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_mtp_layers": 1}))
    return folder


def _with_mtp(
    source: Path, folder: Path, prefix: str, projection: str, norms: tuple[str, ...], layer: str | None = None
) -> Path:
    """``source`` in one shard at ``folder``, plus an MTP module under ``prefix``: a decoder layer (at
    ``layer``, or ``prefix`` itself) with the last one's weights, a projection of the embedding and
    hidden state together, and norms."""
    config = json.loads((source / "config.json").read_text())
    tensors = load_tensors(source)
    last = _layer_stem(source) + f"{config.get('text_config', config)['num_hidden_layers'] - 1}."
    for name, tensor in list(tensors.items()):
        if name.startswith(last):
            tensors[(layer or prefix) + name[len(last) :]] = tensor.clone()
    hidden = config.get("text_config", config)["hidden_size"]
    tensors[f"{prefix}{projection}.weight"] = torch.randn(hidden, 2 * hidden)
    for norm in norms:
        tensors[f"{prefix}{norm}.weight"] = torch.ones(hidden)
    folder.mkdir()
    for side in source.iterdir():  # config, tokenizer and generation config
        if side.suffix != ".safetensors" and "index" not in side.name:
            shutil.copyfile(side, folder / side.name)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def per_expert_copy(source: Path, folder: Path) -> Path:
    """``source`` with every layer's stacked experts stored per expert under the family's names, as
    Qwen3-VL-MoE's FP8 releases and every quantized output store them (one file: tiny models only)."""
    folder.mkdir()
    raw = read_config(source)
    family, config = family_for(raw), load_config(raw)
    tensors = load_tensors(source)
    out = {n: t for n, t in tensors.items() if layer_index(n) is None}
    for layer in sorted({i for n in tensors if (i := layer_index(n)) is not None}):
        group = runtime_layer(
            family, config, layer, {n: t for n, t in tensors.items() if layer_index(n) == layer}
        )
        prefix = layer_prefix(next(iter(group)))
        gate_up, down = (group.pop(prefix + name, None) for name in family.fused_stacks)
        out.update(group)
        if gate_up is not None:
            for e, weights in enumerate(zip(*unstack_experts(gate_up, down), strict=True)):
                out.update({prefix + family.original_expert_name(e, p): w for p, w in enumerate(weights)})
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    for path in source.glob("*.json"):
        if path.name != "model.safetensors.index.json":
            shutil.copy(path, folder / path.name)
    return folder
