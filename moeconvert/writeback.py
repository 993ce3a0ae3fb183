"""Starting a file's writeback to disk while it is still being written.

Every shard is fsynced before its output folder is renamed into place. Linux writes dirty page-cache
pages back only when they pass ``dirty_background_ratio`` of memory or age past
``dirty_expire_centisecs`` (30 s), so a few GB written and then fsynced would reach the disk only at
the fsync, the disk idle while they were computed and copied, the CPU idle while they are flushed.
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` asks the kernel to start writing a range back and returns
without waiting, so the disk works behind the writer and the final fsync finds little left to do
(2 GB in 1 MiB writes, then fsync: 1.04-1.17 s; the same, each 64 MB started behind the writes:
0.69-0.83 s, docs/PERFORMANCE.md, "Writeback behind the writes").

It changes nothing about durability: the fsync still follows, and it alone flushes metadata and the
disk's cache. Where the call does not exist (not Linux) :func:`start_writeback` does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

WRITEBACK_BYTES = 32 << 20  # written bytes of a file between requests to start their writeback
_SYNC_FILE_RANGE_WRITE = 2  # from <fcntl.h>: start writeback of the range's dirty pages, do not wait


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or ``None`` where this C library has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to begin writing ``length`` bytes of ``fd`` from ``offset`` back to disk; whether
    it took the request.

    Advisory: a refusal (a file system that does not support it) is left to the fsync that follows,
    which reports real write errors."""
    function = _sync_file_range()
    if function is None or length <= 0:
        return False
    return function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


class WritebackBehind:
    """Starts the writeback of one file every :data:`WRITEBACK_BYTES` of it, as the writer reports its
    length with :meth:`written`."""

    def __init__(self, fd: int, start: int = 0) -> None:
        self.fd = fd
        self.started = start  # bytes before this offset have had their writeback started

    def written(self, end: int) -> None:
        """The file now holds ``end`` bytes (flushed to the OS, not to disk)."""
        if end - self.started >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.started, end - self.started)
            self.started = end
