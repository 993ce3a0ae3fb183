"""Writeback started behind the writes: the ranges asked for, and the kernel taking them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeconvert import writeback
from moeconvert.checkpoint import ShardedWriter, plan_group

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")


@linux_only
def test_kernel_takes_a_request_for_a_written_file_and_refuses_a_closed_one(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with path.open("wb") as file:
        file.write(os.urandom(1 << 16))
        file.flush()
        assert writeback.start_writeback(file.fileno(), 0, 1 << 16)
        closed = os.dup(file.fileno())
    os.close(closed)
    assert not writeback.start_writeback(closed, 0, 1 << 16)


@linux_only
def test_writer_starts_writeback_of_every_shard_in_contiguous_ranges(tmp_path: Path, monkeypatch) -> None:
    """Each shard's ranges begin at 0, follow one another and leave at most one step unrequested at its
    end (that tail goes with the fsync); the shards read back as written."""
    step = 10_000
    monkeypatch.setattr(writeback, "WRITEBACK_BYTES", step)
    requests: dict[str, list[tuple[int, int, bool]]] = {}
    real = writeback.start_writeback

    def recording(fd: int, offset: int, length: int) -> bool:
        taken = real(fd, offset, length)
        requests.setdefault(Path(os.readlink(f"/proc/self/fd/{fd}")).name, []).append((offset, length, taken))
        return taken

    monkeypatch.setattr(writeback, "start_writeback", recording)
    gen = torch.Generator().manual_seed(5)
    groups = [{f"model.layers.{i}.w": torch.randn(96, 65, generator=gen)} for i in range(6)]
    writer = ShardedWriter(tmp_path, [plan_group(g) for g in groups], max_shard_size=60_000)
    assert len(writer.names) > 1
    for index, group in enumerate(groups):
        writer.write_group(index, group)
    writer.finish()
    assert sorted(requests) == sorted(writer.names)
    for name, ranges in requests.items():
        size = (tmp_path / name).stat().st_size
        assert all(taken for _, _, taken in ranges)
        ends = [0] + [offset + length for offset, length, _ in ranges]
        assert [offset for offset, _, _ in ranges] == ends[:-1]
        assert all(length >= step for _, length, _ in ranges)
        assert 0 <= size - ends[-1] < step + 96 * 65 * 4
    loaded = {}
    for name in writer.names:
        loaded.update(load_file(tmp_path / name))
    for group in groups:
        for key, tensor in group.items():
            assert torch.equal(loaded[key], tensor)
