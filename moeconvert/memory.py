"""Handing freed memory back to the operating system between layers, and what is left of it.

A streaming pass frees each layer's tensors before the next, but glibc's allocator keeps freed blocks
below its (self-raising, up to 32 MB) mmap threshold in its heaps for reuse, and a layer's many
different-sized temporaries fragment those heaps. Left alone, the resident size creeps up layer after
layer although nothing is held: with depth, not with the data. ``malloc_trim`` returns the free pages
at a layer boundary, so the peak stays that of one layer however deep the model is.

Within a layer's forward passes the opposite holds: :func:`reused_heap` keeps freed blocks for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_freed_memory() -> None:
    """Return the allocator's free pages to the OS (glibc); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# mallopt parameters (malloc.h), and the values restored after reused_heap: glibc's default for the
# number of mmapped blocks, and the thresholds its dynamic rule reaches in a process that frees large
# blocks (as torch does all the time): mmap from 32 MiB, trim a free heap top above 64 MiB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_RESTORED = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
_USER_TUNED = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_KEPT_TOP = 2**31 - 1  # mallopt takes a C int: the largest free heap top it can be told to keep
_reusing = 0  # depth of nested reused_heap blocks (verify holds two layers at once)


@contextmanager
def reused_heap() -> Iterator[None]:
    """While the block runs, freed memory stays in the process for the next allocation; on leaving it
    goes back to the OS (glibc; elsewhere, or when the user tuned glibc's allocator, nothing changes).

    A forward pass allocates and frees the same large temporaries op after op. glibc serves a block of
    32 MiB or more (one float32 ``[8192, 1024]`` activation) with a fresh mapping and unmaps it when it
    is freed, so each op faults its output in again, page by page: 2.9 million page faults (11 GiB) in
    one ``quantize`` of the peers benchmark's model, whose peak is 1.4 GB. Served from the heap and kept
    there, the blocks are reused: 1.8 million faults, 5% faster, 14% with a Mixtral-8x7B-width layer,
    for a few percent more peak (docs/PERFORMANCE.md, "Freed memory reused in forward passes"). The
    solves run outside: their buffers are allocated once anyway, and their peak is the layer's.
    """
    global _reusing
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or _user_tuned():
        yield
        return
    if _reusing == 0:
        libc.mallopt(_M_MMAP_MAX, 0)  # every block from the heap...
        libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_TOP)  # ...and a free heap top kept
    _reusing += 1
    try:
        yield
    finally:
        _reusing -= 1
        if _reusing == 0:
            for parameter, value in _RESTORED:
                libc.mallopt(parameter, value)
            libc.malloc_trim(0)


def _user_tuned() -> bool:
    return any(name in os.environ for name in _USER_TUNED) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def available_bytes(device: torch.device) -> int:
    """Memory a run may still take on ``device``: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def memory_budget_bytes(device: torch.device) -> int:
    """All the memory this process may hold on ``device``: what it holds now and what is still free."""
    if device.type == "cuda":
        held = torch.cuda.memory_reserved(device)
    else:
        import psutil

        held = psutil.Process().memory_info().rss
    return held + available_bytes(device)
