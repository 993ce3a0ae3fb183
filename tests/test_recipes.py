"""Shipped recipes parse and run on a tiny model of their family; bad recipes name the bad field."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, invoke_cli, load_tensors

from moeconvert import BadInputError, Scheme, quantize, verify
from moeconvert.pipeline import QuantizeOptions
from moeconvert.recipe import load_recipe, parse_recipe
from moeconvert.tiny import build_tiny_model

RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
FAMILY_OF = {
    "mistralai/Mixtral": "mixtral", "Qwen/Qwen1.5-MoE": "qwen2_moe", "Qwen/Qwen3": "qwen3_moe",
    "deepseek-ai/DeepSeek-V2": "deepseek_v2", "allenai/OLMoE": "olmoe", "microsoft/Phi-3.5-MoE": "phimoe",
    "zai-org/GLM-4.5": "glm4_moe", "zai-org/GLM-4.7-Flash": "glm4_moe_lite",
    "MiniMaxAI/MiniMax-M2": "minimax_m2", "Qwen/Qwen3-Next": "qwen3_next", "Qwen/Qwen3.5": "qwen3_5_moe",
    "baidu/ERNIE-4.5": "ernie4_5_moe", "rednote-hilab/dots.llm1": "dots1", "zai-org/GLM-4.5V": "glm4v_moe",
    "Qwen/Qwen3-VL": "qwen3_vl_moe", "deepseek-ai/DeepSeek-V3.2": "deepseek_v32",
    "LGAI-EXAONE/K-EXAONE": "exaone_moe", "upstage/Solar-Open": "solar_open", "arcee-ai/Trinity": "afmoe",
    "CohereLabs/command-a": "cohere2_moe", "tencent/Hunyuan-A13B": "hunyuan_v1_moe",
    "openbmb/MiniCPM5": "minicpm5_moe", "XiaomiMiMo/MiMo-V2": "mimo_v2_flash",
    "zai-org/GLM-5": "glm_moe_dsa", "LiquidAI/LFM2": "lfm2_moe",
    "tencent/Hy3": "hy_v3", "JetBrains/Mellum2": "mellum", "reflection/Beam": "beam",
    "poolside/laguna": "laguna", "allenai/FlexOlmo": "flex_olmo", "ibm-granite/granite-4.0": "granitemoehybrid",
    "ibm-granite/granite-3": "granitemoe",
    "ibm-granite/granite-swash": "granitemoe_swa", "sarvamai/sarvam-105b": "sarvam_mla",
    "ai21labs/AI21-Jamba": "jamba", "skt/A.X-K1": "axk1",
    "Aleph-Alpha/Kolibri": "kolibri1", "RecursiveSI/flint": "flint", "google/gemma-4": "gemma4",
    "nvidia/NVIDIA-Nemotron-3": "nemotron_h", "meta-llama/Llama-4": "llama4",
}  # fmt: skip
# Widths of 128 so the recipes' group sizes (128; 64 for Nemotron 3 Nano's) divide every input.
WIDE = {"hidden_size": 128, "intermediate_size": 128}
WIDER = {
    "qwen2_moe": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128},
    "qwen3_moe": {"moe_intermediate_size": 128, "head_dim": 32},
    "deepseek_v2": {"moe_intermediate_size": 128, "v_head_dim": 32},
    "sarvam_mla": {"moe_intermediate_size": 128, "v_head_dim": 32, "kv_lora_rank": 128},
    "glm4_moe": {"moe_intermediate_size": 128},
    "glm4_moe_lite": {"moe_intermediate_size": 128, "v_head_dim": 32, "q_lora_rank": 128},
    "deepseek_v32": {"moe_intermediate_size": 128, "v_head_dim": 32, "q_lora_rank": 128, "kv_lora_rank": 128},
    "glm_moe_dsa": {"moe_intermediate_size": 128, "v_head_dim": 32, "q_lora_rank": 128, "kv_lora_rank": 128},
    "minimax_m2": {"head_dim": 32},
    "qwen3_next": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128, "head_dim": 32},
    "qwen3_5_moe": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128, "head_dim": 32},
    "ernie4_5_moe": {"moe_intermediate_size": 128},
    "exaone_moe": {"moe_intermediate_size": 128, "head_dim": 32},
    "dots1": {"moe_intermediate_size": 128, "head_dim": 32},
    "solar_open": {"moe_intermediate_size": 128, "head_dim": 32},
    "afmoe": {"moe_intermediate_size": 128, "head_dim": 32},
    "cohere2_moe": {"prefix_dense_intermediate_size": 128, "head_dim": 32},
    "hunyuan_v1_moe": {"head_dim": 32},
    "minicpm5_moe": {"moe_intermediate_size": 128, "head_dim": 32},
    "axk1": {"moe_intermediate_size": 128, "v_head_dim": 32, "q_lora_rank": 128, "kv_lora_rank": 128},
    "flint": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128, "head_dim": 32},
    "kolibri1": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128, "head_dim": 32},
    "mimo_v2_flash": {"moe_intermediate_size": 128, "v_head_dim": 32},
    "lfm2_moe": {"moe_intermediate_size": 128},
    "hy_v3": {"moe_intermediate_size": 128, "head_dim": 32},
    "mellum": {"moe_intermediate_size": 128, "head_dim": 32},
    "beam": {"moe_intermediate_size": 128, "head_dim": 32},
    "laguna": {"moe_intermediate_size": 128, "shared_expert_intermediate_size": 128, "head_dim": 32},
    "granitemoehybrid": {"shared_intermediate_size": 128},
    "gemma4": {"moe_intermediate_size": 128, "head_dim": 32, "global_head_dim": 32},
    "nemotron_h": {"moe_intermediate_size": 128, "moe_shared_expert_intermediate_size": 128, "head_dim": 32},
    "llama4": {"intermediate_size": 256, "intermediate_size_mlp": 128, "head_dim": 32},  # not square
    "qwen3_vl_moe": {  # experts twice the hidden size: no stack is square, its orientation shows
        "moe_intermediate_size": 256,
        "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True},
    },
    "glm4v_moe": {
        "moe_intermediate_size": 128,
        "head_dim": 32,  # 16 rotary dims: 8 frequencies over time, height and width
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5, "mrope_section": [4, 2, 2]},
    },
}


def family_of(model: str) -> str:
    """The family of the longest prefix of ``model`` (Qwen/Qwen3-Next, Qwen/Qwen3.5 and Qwen/Qwen3-VL before Qwen/Qwen3,
    zai-org/GLM-4.5V before zai-org/GLM-4.5)."""
    return max(((p, f) for p, f in FAMILY_OF.items() if model.startswith(p)), key=lambda pf: len(pf[0]))[1]


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wide")
    families = sorted({family_of(load_recipe(r).model) for r in RECIPES})
    return {f: build_tiny_model(f, root / f, **{**WIDE, **WIDER.get(f, {})}) for f in families}


def test_every_family_has_a_recipe() -> None:
    assert len(RECIPES) >= 8
    assert {family_of(load_recipe(r).model) for r in RECIPES} == set(FAMILY_OF.values())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_its_family(recipe: Path, wide_models: dict[str, Path], tmp_path: Path) -> None:
    parsed = load_recipe(recipe)
    source = wide_models[family_of(parsed.model)]
    out = tmp_path / "out"
    args = [
        "quantize",
        str(source),
        "--recipe",
        str(recipe),
        "-o",
        str(out),
        "--samples",
        "4",
        "--seq-len",
        "64",
        "--no-verify",
    ]
    result = invoke_cli(*args)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = config["config_groups"]
    bits = sorted(g["weights"]["num_bits"] for g in groups.values())
    expected = sorted({parsed.scheme.bits} | {r.scheme.bits for r in parsed.rules if r.scheme is not None})
    assert bits == expected
    assert all(
        g["weights"]["group_size"] == (None if parsed.scheme.group_size == -1 else parsed.scheme.group_size)
        for g in groups.values()
    )
    tensors = load_tensors(out)
    for rule in parsed.rules:
        if rule.scheme is None:  # kept: plain weights, listed in ignore
            kept = [n for n in tensors if rule.pattern in n and n.endswith(".weight")]
            assert kept and all(n[: -len(".weight")] in config["ignore"] for n in kept)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("scheme: {bits: 4, colour: red}", "scheme.colour: unknown key"),
        ("scheme: {bits: four}", "scheme.bits: expected int"),
        ("scheme: {bits: 3}", "scheme: bits must be 4 or 8"),
        (
            "scheme: {group_size: 32}\nrules: [{pattern: 'nothing_like_this', scheme: null}]",
            "match no module",
        ),
        ("rules: [{pattern: '('}]", "rules[0].pattern: invalid regex"),
        ("calibration: {samples: many}", "calibration.samples: expected int"),
        ("verify: {max_kl: high}", "verify.max_kl: expected float"),
        ("frobnicate: true", "frobnicate: unknown key"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_recipe_names_the_field(
    text: str, fragment: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = invoke_cli(
        "quantize",
        str(tiny_models["mixtral"]),
        "--recipe",
        str(recipe),
        "-o",
        str(tmp_path / "out"),
        "--dry-run",
    )
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("calibration: {samples: 0}", "calibration.samples: must be at least 1, not 0"),
        ("calibration: {seq_len: -8}", "calibration.seq_len: must be at least 1, not -8"),
        ("calibration: {min_tokens: -1}", "calibration.min_tokens: must be at least 0, not -1"),
        ("verify: {min_top1: 1.5}", "verify.min_top1: must be a fraction from 0 to 1, not 1.5"),
        ("verify: {max_kl: -0.1}", "verify.max_kl: must be a number of at least 0 (inf: no limit), not -0.1"),
        ("verify: {max_layer_error: .nan}", "verify.max_layer_error: must be a number of at least 0"),
    ],
)
def test_recipe_values_out_of_range_are_refused(text: str, fragment: str) -> None:
    """Values of the right type that no run could use: refused at load, not after an hour of quantizing."""
    with pytest.raises(BadInputError, match=re.escape(fragment)):
        parse_recipe(yaml.safe_load(text))
    assert parse_recipe(yaml.safe_load("verify: {max_kl: .inf, min_top1: 0}")).verify["max_kl"] == math.inf


def test_thresholds_that_mean_nothing_are_refused_before_any_work(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_models["mixtral"])
    with pytest.raises(
        BadInputError, match="verify threshold min_top1 must be a fraction from 0 to 1, not 2"
    ):
        verify(model, model, min_top1=2.0, progress=False)
    options = QuantizeOptions(samples=2, seq_len=32, verify_thresholds={"max_kl": math.nan})
    with pytest.raises(BadInputError, match="verify threshold max_kl must be a number of at least 0"):
        quantize(model, Scheme(group_size=32, method="rtn"), output=tmp_path / "out", options=options)
    assert not any(tmp_path.iterdir())


def test_flags_override_the_recipe(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: {bits: 4, group_size: 32, method: rtn}\nformat: gptq\n")
    result = invoke_cli(
        "quantize", str(tiny_models["olmoe"]), "--recipe", str(recipe), "--bits", "8", "--dry-run", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (
        data["scheme"]["bits"] == 8
        and data["scheme"]["group_size"] == 32
        and data["scheme"]["method"] == "rtn"
    )
    assert data["format"] == "gptq"


def test_an_asymmetric_compressed_tensors_output_is_announced_as_such(tiny_models: dict[str, Path]) -> None:
    """MoE loaders take symmetric experts only: asking for zero points in compressed-tensors says so."""
    asym = invoke_cli("quantize", str(tiny_models["olmoe"]), "--group-size", "32", "--asym", "--dry-run")
    sym = invoke_cli("quantize", str(tiny_models["olmoe"]), "--group-size", "32", "--dry-run")
    assert asym.returncode == 0 and sym.returncode == 0, asym.stderr + sym.stderr
    assert "symmetric experts only" in asym.stderr and "symmetric experts only" not in sym.stderr
