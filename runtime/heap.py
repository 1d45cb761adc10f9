"""The process's C heap: glibc's figures for operators, and the handle on glibc itself.

A serving process allocates and frees in many threads: the event loop, the request threads,
the flush workers. ``heap_stats()`` tells the resident size apart from what glibc's ``malloc``
holds (in use, and free inside its arenas), which is where a C library's or a large Python
object's memory lives; Python's small objects live in CPython's own allocator, outside these
figures. ``limit_malloc_arenas`` caps glibc's arenas.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


class _MallInfo2(ctypes.Structure):
    # glibc 2.33+ ``struct mallinfo2`` (malloc.h): every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt")):
        return None  # not glibc (musl, macOS)
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.argtypes = []
        libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _load_glibc()


def glibc():
    """The process's glibc (``ctypes.CDLL``, with ``mallopt`` and, from glibc 2.33,
    ``mallinfo2`` typed), or None when the C library is another."""
    return _LIBC


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (``/proc/self/statm``), None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def heap_stats() -> dict:
    """The process's memory: ``{"resident_mb", "heap_in_use_mb", "heap_free_mb"}``.

    ``heap_in_use_mb``: bytes of the chunks glibc's ``malloc`` has handed out and not had back,
    in every arena, with the blocks it mapped on their own; ``heap_free_mb``: free chunks its
    arenas hold (``mallinfo2``'s ``uordblks + hblkhd`` and ``fordblks``); both None without
    glibc 2.33 or later. ``resident_mb`` None where ``/proc`` is missing.
    """
    resident = resident_bytes()
    result = {
        "resident_mb": round(resident / 2**20, 1) if resident is not None else None,
        "heap_in_use_mb": None,
        "heap_free_mb": None,
    }
    if _LIBC is not None and hasattr(_LIBC, "mallinfo2"):
        info = _LIBC.mallinfo2()
        result["heap_in_use_mb"] = round((info.uordblks + info.hblkhd) / 2**20, 1)
        result["heap_free_mb"] = round(info.fordblks / 2**20, 1)
    return result


# glibc's mallopt() parameter for the most arenas (malloc.h).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc at ``MALLOC_ARENAS`` arenas in this process (``mallopt(M_ARENA_MAX)``),
    unless ``MALLOC_ARENA_MAX`` is in the environment (glibc read it at start) or the C
    library is not glibc. Returns whether it set the cap.

    glibc gives threads that allocate at the same time arenas of their own, up to eight per
    core, and keeps what is freed in each; a server's request threads and flush workers (and an
    inference process's connection threads) then hold memory that no thread uses any more, and
    the process grows for hours under a steady load (docs/benchmarks.md, the soak). Python's
    own objects come from its allocator's pools, whatever the arenas; what the cap slows is C
    code's allocations (psycopg, numpy), which wait for a lock a little more often.
    """
    if "MALLOC_ARENA_MAX" in os.environ or _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
