"""reused_heap: freed blocks are reused inside the block, and handed back when it ends."""

from __future__ import annotations

import resource

import psutil
import pytest
import torch

from moeconvert import memory

pytestmark = pytest.mark.skipif(memory._libc() is None, reason="glibc's allocator only")

BLOCK = 64 << 20  # above glibc's largest mmap threshold: served by a fresh mapping by default


def _faults_of_second_fill() -> int:
    """Minor page faults taken by filling a freshly allocated BLOCK right after an equal one was freed."""
    first = torch.empty(BLOCK, dtype=torch.uint8)
    first.fill_(1)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.empty(BLOCK, dtype=torch.uint8)
    second.fill_(2)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


def test_freed_blocks_are_reused_inside_and_faulted_in_again_outside(monkeypatch):
    for name in memory._USER_TUNED + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)
    pages = BLOCK // 4096
    outside = _faults_of_second_fill()
    with memory.reused_heap():
        inside = _faults_of_second_fill()
    assert outside > pages // 2  # a new mapping: every page faulted in again
    assert inside < pages // 20  # the freed block itself
    assert _faults_of_second_fill() > pages // 2  # defaults back after the block


def test_memory_goes_back_when_the_outermost_block_ends(monkeypatch):
    for name in memory._USER_TUNED + ("GLIBC_TUNABLES",):
        monkeypatch.delenv(name, raising=False)
    process = psutil.Process()
    start = process.memory_info().rss
    with memory.reused_heap():
        with memory.reused_heap():  # nested, as verify holds two layers
            block = torch.ones(BLOCK, dtype=torch.uint8)
            del block
        held = process.memory_info().rss  # the inner end returns nothing yet
        assert held - start > BLOCK // 2
    assert process.memory_info().rss - start < BLOCK // 4


def test_a_user_tuned_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    pages = BLOCK // 4096
    with memory.reused_heap():
        assert _faults_of_second_fill() > pages // 2
