"""The process's C heap figures (``memfuse_project.heap``), which the operator's stats show."""

from __future__ import annotations

import ctypes

import pytest

from memfuse_project import heap

pytestmark = pytest.mark.skipif(
    heap.glibc() is None or not hasattr(heap.glibc(), "mallinfo2"), reason="glibc 2.33 or later"
)

BLOCK = 64 * 1024  # under glibc's mmap threshold: the blocks come from an arena
BLOCKS = 480  # 30 MB


def test_heap_figures_follow_what_malloc_hands_out_and_holds():
    """30 MB of blocks from malloc count as in use; freed below a block still in use (so
    free() cannot give them back from the top of the heap), they count as free, and in use
    falls back."""
    libc = heap.glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = heap.heap_stats()

    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)
    held = heap.heap_stats()
    for block in blocks[:-1]:
        libc.free(block)
    freed = heap.heap_stats()
    libc.free(blocks[-1])

    assert held["heap_in_use_mb"] >= before["heap_in_use_mb"] + 29
    assert held["resident_mb"] >= before["resident_mb"] + 25
    assert freed["heap_in_use_mb"] <= held["heap_in_use_mb"] - 29
    assert freed["heap_free_mb"] >= before["heap_free_mb"] + 25
