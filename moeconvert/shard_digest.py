"""SHA-256 of a file while it is being written, read back from the page cache by its own thread.

One SHA-256 runs at about 1.8 GB/s on a core, slower than an NVMe disk takes writes, and a file's
digest cannot be split across cores. A writer that hashed its own bytes before dropping them would
be held to that rate. Reading each shard back instead (mapped, so no copy: ~15% over hashing bytes
already in memory) lets every shard be hashed on its own core while later shards are written, and
the writer never waits for a digest nor keeps bytes alive for one.

Only where hashing falls behind (fewer cores than shards in flight, a disk faster than SHA-256) does
the writer wait: at most :data:`MAX_UNHASHED_BYTES` written bytes may be awaiting their hash
(:class:`HashBacklog`). Unbounded, that backlog could outgrow the page cache on a large model, and
every evicted page would be read from disk a second time, competing with the writes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

MAP_BYTES = 4 << 20  # the most of a shard mapped at once (mapped pages count in the process's RSS)
MAX_UNHASHED_BYTES = 1 << 30  # written bytes that may await their hash before the writer waits


def hash_workers(shards: int) -> int:
    """Threads for hashing: one per shard that can be in progress at once, at most one per usable core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(shards, cores))


class HashBacklog:
    """Bytes written but not yet hashed, over all of a writer's shards, and a wait for them to shrink."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_UNHASHED_BYTES if limit is None else limit
        self.pending = 0
        self.peak = 0  # the most bytes ever pending at once
        self._changed = threading.Condition()

    def add(self, size: int) -> None:
        with self._changed:
            self.pending += size
            self.peak = max(self.peak, self.pending)

    def remove(self, size: int) -> None:
        with self._changed:
            self.pending -= size
            self._changed.notify_all()

    def wait_for_room(self) -> None:
        """Return once no more than ``limit`` bytes await their hash. Every pending byte belongs to a
        shard that is closed or being written, so its thread runs now or after the shards before it."""
        with self._changed:
            self._changed.wait_for(lambda: self.pending <= self.limit)


class GrowingFileDigest:
    """The sha256 of ``path``, computed by :meth:`run` (on a worker thread) as the writer reports
    progress with :meth:`advance` and, at the end, :meth:`close`.

    The writer must report only bytes already handed to the OS (written and flushed): the digest
    reads the file through its own descriptor, and mapping past the file's end would fault. Reported
    bytes count in ``backlog`` until they are hashed (or until :meth:`run` has ended, even by an error,
    so that a failed hash never leaves the writer waiting).
    """

    def __init__(self, path: Path, backlog: HashBacklog | None = None) -> None:
        self.path = Path(path)
        self.backlog = backlog or HashBacklog()
        self._ready = 0  # bytes of the file that the writer has written
        self._counted = 0  # bytes added to the backlog and not yet removed
        self._closed = False  # no more bytes will come
        self._ended = False  # run() has returned or raised: nothing more is hashed
        self._changed = threading.Condition()

    def advance(self, size: int) -> None:
        """The file now holds at least ``size`` bytes."""
        with self._changed:
            if size > self._ready and not self._ended:
                self.backlog.add(size - self._ready)
                self._counted += size - self._ready
            self._ready = max(self._ready, size)
            self._changed.notify()

    def close(self) -> None:
        """No more bytes will come (the file is complete, or its writing was given up)."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def run(self) -> str:
        """Hash the file up to its last reported size once it is closed; returns the hex digest."""
        digest = hashlib.sha256()
        done = 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while True:
                    ready, closed = self._wait_past(done)
                    if done == ready and closed:
                        return digest.hexdigest()
                    start, done = done, _hash_range(digest, fd, done, min(ready, done + MAP_BYTES))
                    self._hashed(done - start)
            finally:
                os.close(fd)
        finally:
            self._end()

    def _hashed(self, size: int) -> None:
        with self._changed:
            self._counted -= size
        self.backlog.remove(size)

    def _end(self) -> None:
        """Take whatever this digest still counts out of the backlog; later reports add nothing."""
        with self._changed:
            self._ended = True
            left, self._counted = self._counted, 0
        self.backlog.remove(left)

    def _wait_past(self, done: int) -> tuple[int, bool]:
        """Wait until the file holds more than ``done`` bytes or is closed; returns (size, closed)."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready > done or self._closed)
            return self._ready, self._closed


def _hash_range(digest: hashlib._Hash, fd: int, start: int, end: int) -> int:
    """Feed bytes ``start:end`` of the file to ``digest`` through a mapping (read, where the file
    system cannot map files); returns ``end``."""
    if end <= start:
        return start
    base = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping must start on this boundary
    try:
        mapped = mmap.mmap(fd, end - base, offset=base, access=mmap.ACCESS_READ)
    except OSError:
        return _read_range(digest, fd, start, end)
    with mapped, memoryview(mapped) as whole, whole[start - base :] as wanted:
        digest.update(wanted)  # releases the GIL while it hashes
    return end


def _read_range(digest: hashlib._Hash, fd: int, start: int, end: int) -> int:
    """The same as :func:`_hash_range` through ``pread`` (a copy per read, for unmappable files)."""
    while start < end:
        data = os.pread(fd, end - start, start)
        if not data:
            raise OSError(f"file ended at byte {start}, {end - start} bytes before what was written")
        digest.update(data)
        start += len(data)
    return end
