"""inspect: counts from headers must equal a direct count over the real model's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAMILIES, MTP_FAMILIES, load_model, load_tensors, run_cli
from conftest import with_mtp as add_mtp

from moeconvert import Scheme, inspect_model, quantize
from moeconvert.families import family_for
from moeconvert.pipeline import QuantizeOptions
from moeconvert.tiny import VISION_CONFIGS, build_tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_the_model(family: str, tiny_models: dict[str, Path]) -> None:
    summary = inspect_model(str(tiny_models[family]))
    model = load_model(tiny_models[family])
    params = model.state_dict()  # parameters plus persistent buffers (DeepSeek-V3 correction bias)
    if model.config.get_text_config().tie_word_embeddings:  # one tensor under two names (Cohere's head)
        assert params.pop("lm_head.weight").data_ptr() == params["model.embed_tokens.weight"].data_ptr()
    total = sum(p.numel() for p in params.values())
    block = family_for({"model_type": family}).block  # mlp, or LFM2's feed_forward
    routed = sum(p.numel() for n, p in params.items() if f".{block}.experts." in n)
    tower = sum(p.numel() for n, p in params.items() if n.startswith("model.visual."))  # not per token
    assert (tower > 0) == (family in VISION_CONFIGS)
    config = model.config.get_text_config()
    experts = summary.num_experts
    assert summary.family == family
    assert summary.total_params == total and summary.tower_params == tower
    assert summary.routed_expert_params == routed
    assert summary.active_params == total - tower - routed + routed * summary.top_k // experts
    assert summary.top_k == 2 and experts == 8
    decoder = model.get_decoder()
    moe_layers = [i for i, layer in enumerate(decoder.layers) if hasattr(getattr(layer, block), "experts")]
    assert summary.moe_layers == moe_layers
    assert summary.num_layers == config.num_hidden_layers
    assert summary.weight_bytes["bf16"] == 2 * total
    assert summary.weight_bytes["int4"] < summary.weight_bytes["int8"] < summary.weight_bytes["bf16"]
    assert summary.active_bytes_per_token["bf16"] < summary.weight_bytes["bf16"]
    assert summary.shards > 1 and summary.layout == "original"
    shared = family_for({"model_type": family}).shared_experts
    assert (summary.shared_experts > 0) == any(f".{shared}." in n for n in params), shared


def test_family_quirks(tiny_models: dict[str, Path]) -> None:
    qwen2 = inspect_model(str(tiny_models["qwen2_moe"]))
    assert qwen2.dense_layers == [1] and qwen2.shared_experts == 1
    deepseek = inspect_model(str(tiny_models["deepseek_v3"]))
    assert deepseek.dense_layers == [0] and deepseek.moe_layers == [1, 2]
    assert inspect_model(str(tiny_models["qwen3_moe"])).shared_experts == 0


def test_a_granite_model_without_its_shared_mlp_counts_none_and_quantizes(tmp_path: Path) -> None:
    """granitemoeshared's shared MLP is absent where shared_intermediate_size is 0 (its config class's
    default): no shared expert is counted, and quantize converts the model without one."""
    folder = build_tiny_model("granitemoeshared", tmp_path / "src", train_steps=0, shared_intermediate_size=0)
    assert not any("shared_mlp" in n for n in load_tensors(folder))
    assert inspect_model(str(folder)).shared_experts == 0
    scheme = Scheme(bits=4, group_size=32, method="rtn")
    quantize(
        str(folder),
        scheme,
        output=tmp_path / "out",
        options=QuantizeOptions(samples=2, seq_len=32),
        verify=False,
    )
    assert inspect_model(str(tmp_path / "out")).total_params == inspect_model(str(folder)).total_params


@pytest.mark.parametrize(
    "output_format, method, layout",
    [("compressed-tensors", "compressed-tensors", "original"), ("fused", "moeconvert", "fused")],
)
def test_a_quantized_output_shows_the_layout_it_stores(
    output_format: str, method: str, layout: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Per-expert modules (what vLLM reads) or stacks, as the output's own names say: its parameters are
    counted from transformers' model, whose names are stacked in both."""
    options = QuantizeOptions(samples=2, seq_len=32, format=output_format)
    scheme = Scheme(bits=4, group_size=32, method="rtn")
    quantize(str(tiny_models["qwen3_moe"]), scheme, output=tmp_path / "out", options=options, verify=False)
    summary = inspect_model(str(tmp_path / "out"))
    assert summary.quantization == method and summary.layout == layout
    assert summary.total_params == inspect_model(str(tiny_models["qwen3_moe"])).total_params


@pytest.mark.parametrize(
    "family",
    MTP_FAMILIES,
)
def test_mtp_layers_count_in_the_floor_not_in_the_active_parameters(
    family: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """An MTP layer holds a decoder layer's experts and more: resident (at full precision, as conversions
    carry it) but off every token's path. Qwen3-Next keeps its MTP block beside the model (``mtp.*``),
    ERNIE-4.5 in it (``model.mtp_block.0.*``...)."""
    source, _, block = add_mtp(family, tiny_models[family], tmp_path / "source")
    plain, with_mtp = inspect_model(str(tiny_models[family])), inspect_model(str(source))
    mtp = sum(p.numel() for n, p in load_tensors(source).items() if n.startswith(block))
    layered = block.endswith(".3.")  # a decoder layer after the last (GLM-4.5V's in model.language_model)
    assert with_mtp.mtp_layers == ([3] if layered else []) and plain.mtp_layers == []
    assert with_mtp.mtp_params == mtp and plain.mtp_params == 0
    assert (with_mtp.moe_layers, with_mtp.dense_layers) == (plain.moe_layers, plain.dense_layers)
    assert with_mtp.total_params == plain.total_params + mtp
    assert (with_mtp.active_params, with_mtp.routed_expert_params) == (
        plain.active_params,
        plain.routed_expert_params,
    )
    assert with_mtp.active_bytes_per_token == plain.active_bytes_per_token
    for label in ("bf16", "int8", "int4"):  # kept in bf16 whatever the scheme
        assert with_mtp.weight_bytes[label] == plain.weight_bytes[label] + 2 * mtp, label
    table = run_cli("inspect", str(source)).stdout
    assert ("and 1 MTP layer of " if layered else "and MTP modules of ") in table
    assert "(carried, not active)" in table


def test_fused_layout_counts_the_same(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from moeconvert import fuse

    fused = fuse(str(tiny_models["olmoe"]), tmp_path / "fused")
    a, b = inspect_model(str(tiny_models["olmoe"])), inspect_model(str(fused))
    assert b.layout == "fused"
    assert (a.total_params, a.active_params, a.routed_expert_params) == (
        b.total_params,
        b.active_params,
        b.routed_expert_params,
    )


def test_cli_json_and_table(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = run_cli("inspect", str(tiny_models["mixtral"]), "--json", "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == json.loads(report.read_text())
    assert (
        data["family"] == "mixtral"
        and data["total_params"] == inspect_model(str(tiny_models["mixtral"])).total_params
    )
    table = run_cli("inspect", str(tiny_models["mixtral"]))
    assert (
        table.returncode == 0 and "active params/token" in table.stdout and "8 routed, top-2" in table.stdout
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_outputs_count_their_original_parameters(
    family: str, quantized: dict, trained_models: dict[str, Path]
) -> None:
    """Packed words and scales are not parameters: a quantized folder is summarised with its original's
    counts (from the config's model), and says how it is quantized."""
    source = inspect_model(str(trained_models[family]))
    summary = inspect_model(str(quantized[family, "w4"]))
    assert source.quantization is None and summary.quantization == "compressed-tensors"
    for field in ("total_params", "active_params", "routed_expert_params", "weight_bytes", "layers"):
        assert getattr(summary, field) == getattr(source, field), field
    assert "I32" in summary.dtypes and "I32" not in source.dtypes


def test_cli_table_of_a_quantized_output(quantized: dict) -> None:
    table = run_cli("inspect", str(quantized["mixtral", "w4"]))
    assert table.returncode == 0, table.stderr
    assert (
        "quantized            compressed-tensors" in table.stdout and "disk to quantize" not in table.stdout
    )
