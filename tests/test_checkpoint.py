"""Sharded writer/reader and layout functions on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moeconvert.checkpoint import (
    Concatenated,
    ShardedReader,
    ShardedWriter,
    parse_size,
    plan_group,
    split_into_shards,
)
from moeconvert.errors import OutputExistsError
from moeconvert.layout import stack_experts, unstack_experts
from moeconvert.manifest import file_sha256
from moeconvert.output_folder import OutputFolder
from moeconvert.relayout import concat_experts


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


def _write(folder: Path, groups: list[dict], cap: int = 200) -> ShardedWriter:
    writer = ShardedWriter(folder, [plan_group(g) for g in groups], max_shard_size=cap)
    for i, group in enumerate(groups):
        writer.write_group(i, group)
    writer.finish()
    return writer


def test_writer_digests_are_the_shards_sha256(tmp_path: Path) -> None:
    """The manifest takes each shard's sha256 from the writer, read back behind the writes."""
    writer = _write(tmp_path, _groups())
    assert sorted(writer.digests) == sorted(writer.names)
    assert all(writer.digests[n] == file_sha256(tmp_path / n) for n in writer.names)


def test_writer_streams_concatenated_parts_as_their_stack(tmp_path: Path) -> None:
    """fuse writes stacked experts from the experts themselves: the bytes must be torch.stack's."""
    gen = torch.Generator().manual_seed(1)
    gate, up, down = (
        [torch.randn(6, 4, generator=gen).to(torch.bfloat16) for _ in range(3)] for _ in range(3)
    )
    lazy, real = concat_experts(gate, up, down), stack_experts(gate, up, down)
    assert all(isinstance(t, Concatenated) for t in lazy)
    assert all(torch.equal(a.materialize(), b) for a, b in zip(lazy, real, strict=True))
    (tmp_path / "lazy").mkdir()
    (tmp_path / "real").mkdir()
    _write(tmp_path / "lazy", [{"a.gate_up": lazy[0], "a.down": lazy[1]}], cap=10**9)
    _write(tmp_path / "real", [{"a.gate_up": real[0], "a.down": real[1]}], cap=10**9)
    assert (tmp_path / "lazy/model.safetensors").read_bytes() == (
        tmp_path / "real/model.safetensors"
    ).read_bytes()
    mixed = concat_experts([gate[0].float(), *gate[1:]], up, down)  # a real stack promotes: so does this
    assert all(isinstance(t, torch.Tensor) for t in mixed)


def test_reader_views_equal_copies_and_never_change_the_file(tmp_path: Path) -> None:
    groups = _groups()
    _write(tmp_path, groups)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    names = sorted(k for g in groups for k in g)
    copies = ShardedReader(tmp_path).get_many(names)
    reader = ShardedReader(tmp_path)
    reader.views = True
    views = reader.get_many(names)
    assert all(v.dtype == copies[n].dtype and torch.equal(v, copies[n]) for n, v in views.items())
    views["model.layers.0.w1"].fill_(7)  # copy-on-write: the tensor changes, the file does not
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == before
    assert torch.equal(reader.get("model.layers.0.w1"), copies["model.layers.0.w1"])
