"""fuse/unfuse against transformers itself: same tensors, same logits, bit-exact round trip."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, MTP_FAMILIES, load_model, load_tensors, runtime_root, with_mtp

from moeconvert import fuse, unfuse
from moeconvert.checkpoint import ShardedReader
from moeconvert.families import family_for
from moeconvert.source import read_config


@pytest.fixture(scope="module")
def fused(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    return {f: fuse(str(tiny_models[f]), root / f, max_shard_size="200KB") for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_matches_transformers_save(
    family: str, fused: dict[str, Path], transformers_fused: dict[str, Path]
) -> None:
    """fuse writes what transformers writes, under the release's names (transformers names Nemotron-H's
    ``backbone.`` text model ``model.``, as it loads it)."""
    ours = {runtime_root(n): t for n, t in load_tensors(fused[family]).items()}
    theirs = load_tensors(transformers_fused[family])
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    stack = family_for(read_config(fused[family])).fused_gate_up
    assert any(name.endswith("." + stack) for name in ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_gives_identical_logits(
    family: str, fused: dict[str, Path], tiny_models: dict[str, Path]
) -> None:
    original, converted = load_model(tiny_models[family]), load_model(fused[family])
    tokens = torch.randint(
        0, original.config.get_text_config().vocab_size, (3, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected, actual = original(tokens).logits, converted(tokens).logits
    assert torch.equal(expected, actual)
    assert expected.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_unfuse_restores_every_tensor_bit_for_bit(
    family: str, fused: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    restored = unfuse(str(fused[family]), tmp_path / "restored")
    before, after = load_tensors(tiny_models[family]), load_tensors(restored)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        assert torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.mark.parametrize(
    "family",
    MTP_FAMILIES,
)
def test_mtp_layers_are_carried_through_fuse_and_back(
    family: str, tiny_models: dict[str, Path], fused: dict[str, Path], tmp_path: Path
) -> None:
    """DeepSeek-V3 and GLM-4.5 ship an MTP layer after the decoder layers, Qwen3-Next an MTP block beside
    them, experts and all: fuse carries it under its own names (transformers' model has no module for
    it), the decoder layers are fused as without it, and unfuse gives back every byte."""
    source, _, mtp = with_mtp(family, tiny_models[family], tmp_path / "source")
    out = fuse(str(source), tmp_path / "fused", max_shard_size="200KB")
    before, after = load_tensors(source), load_tensors(out)
    carried = {name: tensor for name, tensor in before.items() if name.startswith(mtp)}
    assert any(".mlp.experts.0.down_proj." in name for name in carried)
    assert {name: tensor for name, tensor in after.items() if name.startswith(mtp)}.keys() == carried.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in carried.items())
    without = load_tensors(fused[family])
    assert {name for name in after if not name.startswith(mtp)} == set(without)
    assert all(torch.equal(after[name], tensor) for name, tensor in without.items())

    restored = load_tensors(unfuse(str(out), tmp_path / "restored"))
    assert sorted(restored) == sorted(before)
    assert all(
        torch.equal(restored[name].view(torch.uint8), t.view(torch.uint8)) for name, t in before.items()
    )


def test_fuse_copies_config_and_shards_at_layer_boundaries(
    fused: dict[str, Path], tiny_models: dict[str, Path]
) -> None:
    out = fused["qwen2_moe"]
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tiny_models["qwen2_moe"] / "config.json").read_text()
    )
    assert (out / "generation_config.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_of_layer: dict[str, set[str]] = {}
    for name, shard in index["weight_map"].items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "top"
        shard_of_layer.setdefault(layer, set()).add(shard)
    assert all(len(shards) == 1 for shards in shard_of_layer.values()), shard_of_layer
    assert len(set(index["weight_map"].values())) > 1
    sizes = sum(t.numel() * t.element_size() for t in load_tensors(out).values())
    assert index["metadata"]["total_size"] == sizes


def test_fuse_bf16_single_file(tmp_path: Path) -> None:
    from moeconvert.tiny import build_tiny_model

    source = build_tiny_model("mixtral", tmp_path / "bf16", dtype=torch.bfloat16)
    out = fuse(str(source), tmp_path / "fused")
    tensors = load_tensors(out)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    back = load_tensors(unfuse(str(out), tmp_path / "back"))
    original = load_tensors(source)
    assert all(torch.equal(back[k].view(torch.uint8), original[k].view(torch.uint8)) for k in original)


def test_gate_rows_come_first(fused: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    original, stacked = load_tensors(tiny_models["mixtral"]), load_tensors(fused["mixtral"])
    gate_up = stacked["model.layers.1.mlp.experts.gate_up_proj"]
    size = gate_up.shape[1] // 2
    assert torch.equal(gate_up[5, :size], original["model.layers.1.block_sparse_moe.experts.5.w1.weight"])
    assert torch.equal(gate_up[5, size:], original["model.layers.1.block_sparse_moe.experts.5.w3.weight"])


def test_fuse_holds_about_one_layer_in_memory(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Track every tensor the reader hands out; at no time may more than one layer's worth be alive."""
    live: dict[int, int] = {}
    peak = [0]
    original_get_many = ShardedReader.get_many

    def tracking_get_many(self: ShardedReader, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = original_get_many(self, names)
        for tensor in tensors.values():
            key = id(tensor)
            live[key] = tensor.numel() * tensor.element_size()
            weakref.finalize(tensor, live.pop, key, None)
        peak[0] = max(peak[0], sum(live.values()))
        return tensors

    monkeypatch.setattr(ShardedReader, "get_many", tracking_get_many)
    source = tiny_models["mixtral"]
    fuse(str(source), tmp_path / "out")
    with ShardedReader(source) as reader:
        layer_sizes = [
            sum(reader.metas[n].nbytes for n in names) for _, names in reader.layer_names().items()
        ]
        total = reader.total_bytes
    assert 0 < peak[0] <= max(layer_sizes)
    assert peak[0] < total / 2
