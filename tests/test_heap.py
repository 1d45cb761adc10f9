"""The process's C heap figures (``runtime.heap``), which the operator's stats show."""

from __future__ import annotations

import ctypes

import pytest

from runtime import heap

pytestmark = pytest.mark.skipif(
    heap.glibc() is None or not hasattr(heap.glibc(), "mallinfo2"), reason="glibc 2.33 or later"
)

BLOCK = 64 * 1024  # under glibc's mmap threshold: the blocks come from an arena
BLOCKS = 480  # 30 MB


def test_heap_figures_follow_what_malloc_hands_out():
    """30 MB of blocks from malloc count as in use, and no longer once freed (whatever free
    chunks the process's heap already held, which the blocks may reuse)."""
    libc = heap.glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = heap.heap_stats()

    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)
    held = heap.heap_stats()
    for block in blocks:
        libc.free(block)
    freed = heap.heap_stats()

    assert held["heap_in_use_mb"] >= before["heap_in_use_mb"] + 29
    assert freed["heap_in_use_mb"] <= held["heap_in_use_mb"] - 29
    assert freed["heap_free_mb"] >= 0 and freed["resident_mb"] > 0
