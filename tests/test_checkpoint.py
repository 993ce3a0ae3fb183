"""Sharded writer/reader and layout functions on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moeconvert.checkpoint import (
    OutputFolder,
    ShardedReader,
    ShardedWriter,
    parse_size,
    plan_group,
    split_into_shards,
)
from moeconvert.errors import OutputExistsError
from moeconvert.layout import stack_experts, unstack_experts


def test_parse_size() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("huge")


def _groups() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"model.embed_tokens.weight": torch.randn(10, 4, generator=gen)},
        {f"model.layers.0.w{i}": torch.randn(8, 4, generator=gen).to(torch.bfloat16) for i in range(3)},
        {
            "model.layers.1.a": torch.randint(-8, 8, (5,), dtype=torch.int8, generator=gen),
            "model.layers.1.b": torch.zeros(0),
        },
        {"model.layers.2.x": torch.randn(3, 3, 3, generator=gen)},
    ]


def test_writer_streams_groups_into_capped_shards(tmp_path: Path) -> None:
    groups = _groups()
    plan = [plan_group(g) for g in groups]
    writer = ShardedWriter(tmp_path, plan, max_shard_size=200)
    for i, group in enumerate(groups):
        writer.write_group(i, group)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(writer.names) > 1 and set(index["weight_map"].values()) == set(writer.names)
    loaded = {}
    for name in writer.names:
        loaded.update(load_file(tmp_path / name))
        with safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    expected = {k: v for g in groups for k, v in g.items()}
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    with ShardedReader(tmp_path) as reader:
        assert reader.layer_names()[0] == sorted(groups[1])
        assert torch.equal(reader.get("model.layers.2.x"), groups[3]["model.layers.2.x"])


def test_writer_rejects_tensors_that_differ_from_plan(tmp_path: Path) -> None:
    groups = _groups()
    writer = ShardedWriter(tmp_path, [plan_group(g) for g in groups], max_shard_size=10**9)
    with pytest.raises(RuntimeError):
        writer.write_group(1, groups[1])  # out of order
    writer.write_group(0, groups[0])
    bad = {k: v.float() for k, v in groups[1].items()}
    with pytest.raises(RuntimeError):
        writer.write_group(1, bad)
    writer.abort()


def test_split_never_breaks_a_group() -> None:
    plan = [plan_group(g) for g in _groups()]
    sizes = [sum(t.nbytes for t in g) for g in plan]
    for cap in (1, 50, 100, 200, 10**6):
        shards = split_into_shards(plan, cap)
        assert [g for s in shards for g in s] == list(range(len(plan)))
        for shard in shards:
            assert len(shard) == 1 or sum(sizes[g] for g in shard) <= cap


def test_output_folder_is_atomic(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(KeyError), OutputFolder(final) as staging:
        (staging / "half").write_text("x")
        raise KeyError("crash")
    assert not final.exists() and not list(tmp_path.iterdir())
    with OutputFolder(final) as staging:
        (staging / "done").write_text("1")
    assert (final / "done").read_text() == "1"
    with pytest.raises(OutputExistsError):
        OutputFolder(final).__enter__()
    with pytest.raises(KeyError), OutputFolder(final, force=True) as staging:
        raise KeyError("crash while replacing")
    assert (final / "done").read_text() == "1", "a failed forced run must keep the old output"
    with OutputFolder(final, force=True) as staging:
        (staging / "new").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "new").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stack_unstack_round_trip(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    experts, size, hidden = 5, 6, 4
    gate = [torch.randn(size, hidden, generator=gen).to(dtype) for _ in range(experts)]
    up = [torch.randn(size, hidden, generator=gen).to(dtype) for _ in range(experts)]
    down = [torch.randn(hidden, size, generator=gen).to(dtype) for _ in range(experts)]
    gate_up, stacked_down = stack_experts(gate, up, down)
    assert gate_up.shape == (experts, 2 * size, hidden) and stacked_down.shape == (experts, hidden, size)
    assert torch.equal(gate_up[2, :size], gate[2]) and torch.equal(gate_up[2, size:], up[2])
    g, u, d = unstack_experts(gate_up, stacked_down)
    assert all(torch.equal(a, b) for a, b in zip(g + u + d, gate + up + down, strict=True))
    with pytest.raises(ValueError):
        unstack_experts(gate_up[:, :-1], stacked_down)
