"""verify: parity of fused, 8-bit and 4-bit outputs against the original, and a check that can fail."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, count_calls, load_tensors, run_cli
from safetensors.torch import load_file, save_file

from moeconvert import BadInputError, fuse
from moeconvert.card import write_card
from moeconvert.checkpoint import layer_index
from moeconvert.tiny import build_tiny_model
from moeconvert.verify import report_json, report_path, verify


@pytest.fixture(scope="module")
def parity(
    trained_models: dict[str, Path], quantized: dict, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    root = tmp_path_factory.mktemp("fused_for_verify")
    reports = {}
    for family in FAMILIES:
        fused = fuse(str(trained_models[family]), root / family)
        source = str(trained_models[family])
        reports[family, "fused"] = verify(source, str(fused), samples=4, seq_len=128, progress=False)
        for label in ("w8", "w4"):
            reports[family, label] = verify(
                source, str(quantized[family, label]), samples=4, seq_len=128, progress=False
            )
    return reports


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_numbers(family: str, parity: dict, quantized: dict) -> None:
    fused, w8, w4 = parity[family, "fused"], parity[family, "w8"], parity[family, "w4"]
    assert fused.kind == "lossless" and fused.passed, fused.failures
    assert all(p.identical_tensors for p in fused.layers)
    assert fused.logits_max_abs_diff == 0.0 and fused.kl_mean == 0.0 and fused.top1_agreement == 1.0
    assert all(p.layer_error == 0.0 and p.drift == 0.0 for p in fused.layers)
    assert (w8.kind, w4.kind) == ("int8", "int4")
    assert w8.passed and w4.passed, (w8.failures, w4.failures)
    assert 0.0 < w8.kl_mean < w4.kl_mean
    assert fused.kl_median == fused.kl_p99 == 0.0
    for r in (w8, w4):
        assert 0.0 < r.kl_median <= r.kl_p99 <= r.kl_max and r.kl_median < r.kl_max
    # a token whose two best logits all but tie may flip under 8-bit noise and not under 4-bit noise (one
    # of 512 on the tiny Flint): top-1 orders the two up to one token
    assert w4.top1_agreement <= w8.top1_agreement + 1 / w8.tokens
    # a layer with nothing quantized (Nemotron-H's Mamba layers, kept whole) gives the original's output
    packed = {layer_index(n) for n in load_tensors(quantized[family, "w4"]) if n.endswith(".weight_packed")}
    assert all(p.layer_error == 0.0 for r in (w8, w4) for p in r.layers if p.layer not in packed)
    errors8, errors4 = ([p.layer_error for p in r.layers if p.layer in packed] for r in (w8, w4))
    assert errors8 and all(e > 0.0 for e in errors8 + errors4)
    if family == "phimoe":  # sparsemixer routing flips on tiny input changes whatever the bits: on average
        assert sum(errors8) < sum(errors4), (errors8, errors4)
    else:
        assert all(e8 < e4 for e8, e4 in zip(errors8, errors4, strict=True)), (errors8, errors4)
    assert w4.perplexity_original == pytest.approx(fused.perplexity_original)
    # perplexity moves by noise-level amounts on these models (under 0.01% at 8 bits): bound it, no order.
    # On the tiny Nemotron-H (nearly flat: perplexity 103) one token of 512 whose two best experts all but
    # tie in its last layer changes its route under 8-bit and 4-bit noise alike (KL 0.28; the median
    # token's 1e-6 at 8 bits): that one token moves the perplexity 0.11%
    rel8 = 2e-3 if family == "nemotron_h" else 1e-3
    assert w8.perplexity_converted == pytest.approx(w8.perplexity_original, rel=rel8)
    assert w4.perplexity_converted == pytest.approx(w4.perplexity_original, rel=1e-2)


def _corrupt_busiest_expert(folder: Path, layer: int, out: Path) -> Path:
    """Scale the busiest expert's down projection in ``layer`` by 4 (through its scales)."""
    broken = Path(shutil.copytree(folder, out))
    report = json.loads((broken / "quantization_report.json").read_text())
    counts = next(r for r in report["layers"] if r["layer"] == layer)["tokens_per_expert"]
    busiest = max(range(len(counts)), key=counts.__getitem__)
    shard = broken / "model.safetensors"
    tensors = load_file(shard)
    name = f"model.layers.{layer}.block_sparse_moe.experts.{busiest}.w2.weight_scale"
    tensors[name] = tensors[name] * 4
    save_file(tensors, shard, metadata={"format": "pt"})
    return broken


def test_corrupted_expert_fails_and_names_its_layer(
    trained_models: dict[str, Path], quantized: dict, tmp_path: Path
) -> None:
    broken = _corrupt_busiest_expert(quantized["mixtral", "w4"], 1, tmp_path / "broken")
    report_file = tmp_path / "report.json"
    result = run_cli(
        "verify",
        str(trained_models["mixtral"]),
        str(broken),
        "--samples",
        "4",
        "--seq-len",
        "128",
        "--report",
        str(report_file),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "layer 1" in result.stderr and "Traceback" not in result.stderr
    data = json.loads(report_file.read_text())
    assert data["passed"] is False and data["worst_layer"] == 1
    clean = run_cli(
        "verify",
        str(trained_models["mixtral"]),
        str(quantized["mixtral", "w4"]),
        "--samples",
        "4",
        "--seq-len",
        "128",
        "--json",
    )
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["kl_mean"] < data["kl_mean"] / 10


def test_nan_outputs_fail_every_check_they_reach(
    quantized: dict, trained_models: dict, tmp_path: Path
) -> None:
    """Scales near the dtype's maximum keep the weights finite (the reader's check passes) but overflow
    the forward pass to NaN: NaN compares false with every threshold, and must fail, not slip through."""
    broken = Path(shutil.copytree(quantized["mixtral", "w4"], tmp_path / "broken"))
    shard = broken / "model.safetensors"
    tensors = load_file(shard)
    for name in [n for n in tensors if ".layers.1." in n and n.endswith("w2.weight_scale")]:
        scale = tensors[name]
        near_max = scale.double() / scale.double().abs().max() * (torch.finfo(scale.dtype).max / 8)
        tensors[name] = near_max.to(scale.dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(str(trained_models["mixtral"]), str(broken), samples=2, seq_len=64, progress=False)
    assert report.kl_mean != report.kl_mean, report.kl_mean  # NaN: the case under test
    assert math.isnan(report.kl_max) and math.isnan(report.logits_max_abs_diff)  # maxima keep the NaN
    written = json.loads(report_json(report.to_dict()), parse_constant=lambda c: pytest.fail(f"wrote {c}"))
    assert written["kl_mean"] is None and written["passed"] is False  # strict JSON: null, not NaN
    report_path(broken).write_text(report_json(report.to_dict()))  # as quantize leaves it for the card
    card = write_card(broken).read_text()
    assert "| mean KL(original ‖ quantized) | not finite (limit" in card and "**failed**" in card
    assert not report.passed
    assert any(f.startswith("mean KL nan") and "not finite" in f for f in report.failures), report.failures
    assert report.worst_layer == 1


def test_store_records_the_check_of_an_unverified_output_on_its_card(
    trained_models: dict[str, Path], quantized: dict, tmp_path: Path
) -> None:
    """quantize --no-verify, then verify --store: the report goes into the folder, the card quotes it and
    the manifest covers both. A folder quantize did not write is refused before the comparison."""
    from moeconvert import check

    out = Path(shutil.copytree(quantized["mixtral", "w8"], tmp_path / "out"))
    assert "Not verified" in (out / "README.md").read_text() and not report_path(out).exists()
    source = str(trained_models["mixtral"])
    result = run_cli("verify", source, str(out), "--store", "--samples", "2", "--seq-len", "64")
    assert result.returncode == 0, result.stderr
    stored = json.loads(report_path(out).read_text())
    card = (out / "README.md").read_text()
    assert stored["tokens"] == 2 * 64 and stored["converted"] == str(out) and stored["passed"]
    assert "Not verified" not in card and f"{stored['kl_mean']:.3e}" in card
    assert check(out).passed
    with pytest.raises(BadInputError, match="--store writes into a local quantize output"):
        verify(source, source, store=True, progress=False)
    assert not report_path(trained_models["mixtral"]).exists()


def test_lossless_check_catches_a_single_changed_tensor(
    trained_models: dict[str, Path], tmp_path: Path
) -> None:
    fused = fuse(str(trained_models["olmoe"]), tmp_path / "fused")
    tensors = load_file(fused / "model.safetensors")
    name = "model.layers.2.self_attn.o_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = torch.nextafter(tensors[name][0, 0], torch.tensor(1e9))  # one ulp
    save_file(tensors, fused / "model.safetensors", metadata={"format": "pt"})
    report = verify(str(trained_models["olmoe"]), str(fused), samples=2, seq_len=64, progress=False)
    assert not report.passed and [p.layer for p in report.layers if not p.identical_tensors] == [2]


def test_mismatched_models_are_refused(trained_models: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli("verify", str(trained_models["mixtral"]), str(trained_models["olmoe"]))
    assert result.returncode == 2 and "not a conversion" in result.stderr
    wider = build_tiny_model("mixtral", tmp_path / "wider", hidden_size=128)  # same family and depth
    result = run_cli("verify", str(trained_models["mixtral"]), str(wider))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "is not a conversion of" in result.stderr and "lm_head.weight" in result.stderr


def test_experts_only_conversions_reuse_the_original_attention(
    trained_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When only the MLP changed, the converted layer's error on the original's input goes on from
    the original's residual stream: the same report as running that layer whole."""
    from moeconvert import Scheme, quantize
    from moeconvert.forward import LayerwiseModel
    from moeconvert.quant.targets import Rule

    source = str(trained_models["deepseek_v3"])
    rtn = Scheme(method="rtn", bits=4, group_size=32)
    experts_only = quantize(
        source, rtn, rules=(Rule("self_attn", None),), output=tmp_path / "q", verify=False, progress=False
    ).output
    finished = count_calls(monkeypatch, LayerwiseModel, "run_mlp_half", static=True)
    reused = verify(source, str(experts_only), samples=2, seq_len=64, progress=False)
    assert len(finished) == len(reused.layers)  # one batch per layer
    monkeypatch.setattr(LayerwiseModel, "has_mlp_half", staticmethod(lambda module: False))
    whole = verify(source, str(experts_only), samples=2, seq_len=64, progress=False)
    assert len(finished) == len(reused.layers)
    assert [(p.layer_error, p.drift) for p in reused.layers] == [
        (p.layer_error, p.drift) for p in whole.layers
    ]
    assert reused.kl_mean == whole.kl_mean and reused.layers[-1].layer_error > 0
