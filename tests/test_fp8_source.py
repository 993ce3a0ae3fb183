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

from moeconvert import fuse
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
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
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
