"""FP8 block-quantized sources (DeepSeek-V3's convention, V3.2's, MiniMax-M2's, Qwen3.5's and Qwen3-VL-MoE's too)
are dequantized per layer by fuse and quantize."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tensors, per_expert_copy
from safetensors.torch import save_file

from moeconvert import fuse, inspect_model, unfuse
from moeconvert.checkpoint import layer_index
from moeconvert.pipeline import QuantizeOptions, quantize
from moeconvert.quant.scheme import Scheme
from moeconvert.tiny import build_tiny_model

BLOCK = (32, 32)  # small blocks so the tiny model has ragged edges (kv_a_proj_with_mqa is [40, 64])


def _is_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    return (
        layer_index(name) is not None  # decoder layers only (Qwen3.5's vision encoder stays as it is)
        and name.endswith(".weight")
        and tensor.dim() == 2
        and not name.endswith((".gate.weight", "layernorm.weight"))  # routers stay in full precision
    )


def to_fp8(folder: Path, out: Path) -> Path:
    """Write ``folder``'s model in DeepSeek-V3's FP8 convention: e4m3 weights and a float32
    ``weight_scale_inv`` per block (grid rounded up), plus the fp8 ``quantization_config``."""
    out.mkdir()
    tensors = load_tensors(folder)
    result = {}
    for name, weight in tensors.items():
        if not _is_fp8_linear(name, weight):
            result[name] = weight
            continue
        rows, cols = weight.shape
        grid = (math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]))
        scale = torch.empty(grid, dtype=torch.float32)
        for i in range(grid[0]):
            for j in range(grid[1]):
                block = weight[i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]]
                scale[i, j] = block.abs().max().float().clamp(min=1e-12) / 448.0
        full = scale.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
        result[name] = (weight.float() / full).to(torch.float8_e4m3fn)
        result[name + "_scale_inv"] = scale
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK),
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "generation_config.json", out)
    return out


def dequantized_reference(fp8: Path, out: Path) -> Path:
    """The formula itself, tensor by tensor: fp8 * scale broadcast over its block, cropped at the edges."""
    out.mkdir()
    tensors = load_tensors(fp8)
    result = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv") if name.endswith(".weight") else None
        if scale is None:
            result[name] = tensor
            continue
        dequant = torch.empty(tensor.shape, dtype=torch.float32)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                rows, cols = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
                dequant[rows, cols] = tensor[rows, cols].float() * scale[i, j]
        result[name] = dequant.to(torch.bfloat16)
    return _save_dequantized(fp8, out, result)


def _save_dequantized(fp8: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``out``: ``tensors`` beside ``fp8``'s configs, its ``quantization_config`` dropped."""
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(fp8 / "generation_config.json", out)
    return out


@pytest.fixture(
    scope="module", params=["deepseek_v3", "deepseek_v32", "minimax_m2", "qwen3_5_moe", "qwen3_vl_moe"]
)
def fp8_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    bf16 = build_tiny_model(request.param, root / "bf16", dtype=torch.bfloat16, train_steps=100)
    if request.param == "qwen3_vl_moe":  # its bf16 releases stack experts, its FP8 ones do not
        bf16 = per_expert_copy(bf16, root / "per_expert")
    fp8 = to_fp8(bf16, root / "fp8")
    scales = {name for name in load_tensors(fp8) if name.endswith("_scale_inv")}
    assert any(".experts.0." in name for name in scales) and not any(
        ".gate.weight" in name for name in scales
    )
    return fp8, dequantized_reference(fp8, root / "reference")


def test_fuse_dequantizes_fp8(fp8_pair: tuple[Path, Path], tmp_path: Path) -> None:
    fp8, reference = fp8_pair
    ours, expected = (
        load_tensors(fuse(str(fp8), tmp_path / "a")),
        load_tensors(fuse(str(reference), tmp_path / "b")),
    )
    assert sorted(ours) == sorted(expected)
    assert all(torch.equal(ours[n], expected[n]) for n in expected)
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())


def test_quantize_fp8_equals_quantizing_its_dequantized_original(
    fp8_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    fp8, reference = fp8_pair
    options = QuantizeOptions(samples=8, seq_len=64)
    for name, source in (("from_fp8", fp8), ("from_reference", reference)):
        quantize(
            str(source),
            Scheme(bits=4, group_size=32),
            output=tmp_path / name,
            options=options,
            verify=False,
            progress=False,
        )
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "from_fp8" / file).read_bytes() == (
            tmp_path / "from_reference" / file
        ).read_bytes(), file
    config = json.loads((tmp_path / "from_fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_bad_scale_grid_is_refused(fp8_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import invoke_cli

    fp8, _ = fp8_pair
    broken = Path(shutil.copytree(fp8, tmp_path / "broken"))
    tensors = load_tensors(broken)
    o_proj = next(n for n in tensors if n.endswith("layers.1.self_attn.o_proj.weight_scale_inv"))
    tensors[o_proj] = torch.ones(1, 2)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = invoke_cli("fuse", str(broken), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "scale grid" in result.stderr and "Traceback" not in result.stderr


# Meta's FP8 Llama 4 releases: FBGEMM's row scales (``quant_method: fbgemm_fp8``)
FP8_MAX = 448.0  # the largest e4m3 value


def to_rowwise_fp8(folder: Path, out: Path) -> Path:
    """Write a Llama 4 model as Meta's FP8 releases store it: its MLPs' weights (routed experts' stacks,
    shared expert, dense MLPs) in e4m3 with a float32 ``<name>_scale`` per output row, [out, 1] for a
    Linear, [E, 1, 2I] for ``gate_up_proj`` [E, H, 2I] and [E, H, 1] for ``down_proj`` [E, I, H];
    attention, routers and the vision encoder as they are."""
    out.mkdir()
    result = {}
    for name, weight in load_tensors(folder).items():
        mlp = layer_index(name) is not None and ".feed_forward." in name and ".router." not in name
        if not mlp or weight.dim() < 2:
            result[name] = weight
            continue
        # each output row's largest magnitude: over the input dimension, which is dim 1 of the stacks
        scale = weight.float().abs().amax(dim=1 if weight.dim() == 3 else -1, keepdim=True) / FP8_MAX
        scale = scale.clamp(min=1e-12)
        result[name] = (weight.float() / scale).to(torch.float8_e4m3fn)
        result[name + "_scale"] = scale.transpose(1, 2) if name.endswith("experts.down_proj") else scale
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["self_attn"],
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "generation_config.json", out)
    return out


def rowwise_reference(fp8: Path, out: Path) -> Path:
    """The formula itself: each output row of each FP8 tensor times its own scale, row by row (the
    stacks' output rows are their last dimension; ``down_proj``'s scales are stored [E, H, 1])."""
    out.mkdir()
    tensors = load_tensors(fp8)
    result = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale") and name.removesuffix("_scale") in tensors:
            continue
        if tensor.dtype != torch.float8_e4m3fn:
            result[name] = tensor
            continue
        scale, dequant = tensors[name + "_scale"], torch.empty(tensor.shape, dtype=torch.float32)
        for row in range(tensor.shape[-1] if tensor.dim() == 3 else tensor.shape[0]):
            if tensor.dim() == 2:
                dequant[row] = tensor[row].float() * scale[row, 0]
            elif name.endswith("experts.down_proj"):
                dequant[:, :, row] = tensor[:, :, row].float() * scale[:, row, 0:1]
            else:
                dequant[:, :, row] = tensor[:, :, row].float() * scale[:, 0, row : row + 1]
        result[name] = dequant.to(torch.bfloat16)
    return _save_dequantized(fp8, out, result)


@pytest.fixture(scope="module")
def rowwise_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8_rows")
    bf16 = build_tiny_model("llama4", root / "bf16", dtype=torch.bfloat16, train_steps=100)
    fp8 = to_rowwise_fp8(bf16, root / "fp8")
    scales = [n for n in load_tensors(fp8) if n.endswith("_scale")]
    assert any(n.endswith("experts.down_proj_scale") for n in scales)
    assert any(n.endswith("shared_expert.up_proj.weight_scale") for n in scales)
    return fp8, rowwise_reference(fp8, root / "reference")


def test_quantize_row_scaled_fp8_equals_quantizing_its_dequantized_original(
    rowwise_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """An FP8 Llama 4 release is read dequantized: quantize writes the bytes it writes from the bf16
    weights the formula gives, and unfuse writes those weights per expert."""
    fp8, reference = rowwise_pair
    options = QuantizeOptions(samples=8, seq_len=64)
    for name, source in (("from_fp8", fp8), ("from_reference", reference)):
        quantize(
            str(source), Scheme(bits=4, group_size=32), output=tmp_path / name, options=options, verify=False
        )
        unfuse(str(source), tmp_path / f"{name}_per_expert")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "from_fp8" / file).read_bytes() == (
            tmp_path / "from_reference" / file
        ).read_bytes(), file
    ours, expected = (load_tensors(tmp_path / f"{n}_per_expert") for n in ("from_fp8", "from_reference"))
    assert ours.keys() == expected.keys() and all(torch.equal(ours[n], expected[n]) for n in expected)
    assert "quantization_config" not in json.loads(
        (tmp_path / "from_fp8_per_expert" / "config.json").read_text()
    )
    assert inspect_model(str(fp8)).num_experts == 8


def test_row_scales_that_do_not_fit_their_weight_are_refused(
    rowwise_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from conftest import invoke_cli

    fp8, _ = rowwise_pair
    broken = Path(shutil.copytree(fp8, tmp_path / "broken"))
    tensors = load_tensors(broken)
    name = next(n for n in tensors if n.endswith("layers.1.feed_forward.experts.down_proj_scale"))
    tensors[name] = tensors[name].transpose(1, 2).contiguous()  # [E, 1, H]: as gate_up's would be
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = invoke_cli("unfuse", str(broken), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "FP8 row scales" in result.stderr and "experts.down_proj_scale" in result.stderr


def _counts(folder: Path) -> dict:
    """What ``inspect`` says of a model's size: its parameters, per layer too, and weight bytes."""
    summary = inspect_model(str(folder))
    return {
        "total": summary.total_params,
        "active": summary.active_params,
        "routed": summary.routed_expert_params,
        "layers": [(s.routed_params, s.other_params) for s in summary.layers],
        "bytes": (summary.weight_bytes, summary.active_bytes_per_token),
        "outputs": summary.disk_bytes,
    }


def test_inspect_counts_fp8_blocks_weights_not_their_scales(fp8_pair: tuple[Path, Path]) -> None:
    fp8, reference = fp8_pair
    assert _counts(fp8) == _counts(reference)
    assert inspect_model(str(fp8)).layout == inspect_model(str(reference)).layout


def test_inspect_counts_row_scaled_fp8_weights_not_their_scales(rowwise_pair: tuple[Path, Path]) -> None:
    fp8, reference = rowwise_pair
    assert _counts(fp8) == _counts(reference)
