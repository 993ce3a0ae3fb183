"""SHA-256 of a shard read back behind its writer, on threads of their own."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moeconvert import checkpoint, shard_digest
from moeconvert.checkpoint import ShardedWriter, plan_group
from moeconvert.manifest import file_sha256
from moeconvert.shard_digest import GrowingFileDigest


def _write_in_pieces(path: Path, data: bytes, pieces: list[int], digest: GrowingFileDigest) -> None:
    """Append ``data`` in pieces of the given sizes, reporting each to ``digest`` once it is written."""
    with path.open("wb") as file:
        start = 0
        for size in pieces:
            file.write(data[start : start + size])
            file.flush()
            start += size
            digest.advance(file.tell())
    digest.close()


@pytest.mark.parametrize("map_bytes", [5000, 4096, 1 << 20])  # unaligned, aligned, larger than the file
def test_digest_of_a_growing_file_is_its_sha256(tmp_path: Path, monkeypatch, map_bytes: int) -> None:
    """Mappings must start on page boundaries while the hashed ranges need not: every byte once, in order."""
    monkeypatch.setattr(shard_digest, "MAP_BYTES", map_bytes)
    data = os.urandom(70_001)
    path = tmp_path / "shard"
    path.touch()
    digest = GrowingFileDigest(path)
    with ThreadPoolExecutor(1) as pool:
        hashed = pool.submit(digest.run)
        _write_in_pieces(path, data, [8, 3, 12_345, 4096, 1, 40_000, 13_555], digest)
        assert hashed.result(timeout=30) == hashlib.sha256(data).hexdigest()


def test_digest_reads_where_files_cannot_be_mapped(tmp_path: Path, monkeypatch) -> None:
    """Some file systems (network and FUSE mounts) refuse mmap: the same digest from plain reads."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")

    monkeypatch.setattr(shard_digest.mmap, "mmap", refuse)
    monkeypatch.setattr(shard_digest, "MAP_BYTES", 5000)
    data = os.urandom(23_456)
    path = tmp_path / "shard"
    path.write_bytes(data)
    digest = GrowingFileDigest(path)
    digest.advance(len(data))
    digest.close()
    assert digest.run() == hashlib.sha256(data).hexdigest()


def test_digest_covers_only_what_was_reported(tmp_path: Path) -> None:
    """Bytes the writer has not reported (still in its buffer, or past a failure) are not read."""
    path = tmp_path / "shard"
    path.write_bytes(b"x" * 10_000)
    digest = GrowingFileDigest(path)
    digest.advance(6_000)
    digest.close()
    assert digest.run() == hashlib.sha256(b"x" * 6_000).hexdigest()


def test_writer_with_more_shards_than_hashing_threads(tmp_path: Path, monkeypatch) -> None:
    """Shards waiting for a hashing thread are hashed later from disk; the writer never waits on them."""
    monkeypatch.setattr(checkpoint, "hash_workers", lambda shards: 1)
    gen = torch.Generator().manual_seed(3)
    groups = [{f"model.layers.{i}.w": torch.randn(64, 33, generator=gen)} for i in range(7)]
    writer = ShardedWriter(tmp_path, [plan_group(g) for g in groups], max_shard_size=9_000)
    assert len(writer.names) == 7
    for index, group in enumerate(groups):
        writer.write_group(index, group)
    writer.finish()
    assert writer.digests == {name: file_sha256(tmp_path / name) for name in writer.names}
    assert not [t for t in threading.enumerate() if t.name.startswith(("sha256", "fsync"))]


def test_writer_waits_while_too_much_awaits_its_hash(tmp_path: Path) -> None:
    """Past the backlog's limit the writer waits for the hashing thread, and only until it catches up."""
    path = tmp_path / "shard"
    path.write_bytes(b"y" * 150)
    backlog = shard_digest.HashBacklog(limit=100)
    digest = GrowingFileDigest(path, backlog)
    digest.advance(150)
    assert backlog.pending == 150
    waiter = threading.Thread(target=backlog.wait_for_room)
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive()  # nothing hashes yet, so the writer may not go on
    digest.close()
    assert digest.run() == hashlib.sha256(b"y" * 150).hexdigest()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and backlog.pending == 0


def test_failed_hash_leaves_no_backlog(tmp_path: Path) -> None:
    """A hashing thread that fails (here: its file is gone) must not leave the writer waiting forever."""
    backlog = shard_digest.HashBacklog(limit=100)
    digest = GrowingFileDigest(tmp_path / "missing", backlog)
    digest.advance(500)
    with pytest.raises(FileNotFoundError):
        digest.run()
    digest.advance(800)  # the writer goes on until it learns of the failure at finish()
    assert backlog.pending == 0


def test_writer_backlog_stays_bounded_behind_slow_hashing(tmp_path: Path, monkeypatch) -> None:
    """With hashing slower than writing, no more than the limit plus one write awaits its hash."""
    slow_range = shard_digest._hash_range

    def slowly(*args: object) -> int:
        time.sleep(0.02)
        return slow_range(*args)

    monkeypatch.setattr(shard_digest, "_hash_range", slowly)
    monkeypatch.setattr(shard_digest, "MAP_BYTES", 4096)
    monkeypatch.setattr(shard_digest, "MAX_UNHASHED_BYTES", 2_000)
    monkeypatch.setattr(checkpoint, "hash_workers", lambda shards: 1)
    gen = torch.Generator().manual_seed(4)
    groups = [{f"model.layers.{i}.w": torch.randn(64, 33, generator=gen)} for i in range(7)]
    writer = ShardedWriter(tmp_path, [plan_group(g) for g in groups], max_shard_size=9_000)
    for index, group in enumerate(groups):
        writer.write_group(index, group)
    writer.finish()
    largest_write = 64 * 33 * 4
    assert 2_000 < writer.backlog.peak <= 2_000 + largest_write
    assert writer.backlog.pending == 0
    assert writer.digests == {name: file_sha256(tmp_path / name) for name in writer.names}
