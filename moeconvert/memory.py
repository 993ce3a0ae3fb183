"""Handing freed memory back to the operating system between layers, and what is left of it.

A streaming pass frees each layer's tensors before the next, but glibc's allocator keeps freed blocks
below its (self-raising, up to 32 MB) mmap threshold in its heaps for reuse, and a layer's many
different-sized temporaries fragment those heaps. Left alone, the resident size creeps up layer after
layer although nothing is held: with depth, not with the data. ``malloc_trim`` returns the free pages
at a layer boundary, so the peak stays that of one layer however deep the model is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

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
