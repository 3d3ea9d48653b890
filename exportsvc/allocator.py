"""The C allocator, tuned for the long-running commands (serve, worker) and the process
that prepares import blocks.

Arenas: glibc gives every thread that allocates while another does an arena of its own,
up to eight per core, and memory freed in an arena mostly stays in it. The service's
threads (the event loop, the database thread, the file and upload threads) each pass
import blocks and export pages through their own, so a long job's peak RSS grows with the
number of arenas it filled, not with what it holds: a 1M-resource import peaked at
279-283 MB with the default and at 254 MB with two arenas, in the same time.

Large buffers: glibc serves an allocation from ``mmap`` above a threshold that it raises
to the size of every mapped buffer freed, up to 32 MiB; import blocks and export pages are
then carved from the heap, whose top is given back only when free. A fixed threshold
makes that choice once:

- The import's preparing process keeps every buffer of ``MMAP_THRESHOLD`` (256 KiB) and
  more mapped, given back to the system when freed (a 1M import with 8 MiB blocks: 195 MB
  peak for the service with glibc's rule, 184 MB so).
- ``serve`` and ``worker`` take ``SERVICE_MMAP_THRESHOLD`` (32 MiB, glibc's own
  ceiling): every export page, block and socket buffer comes from the heap and is used
  again. Mapped, each one was a fresh mapping whose every page the kernel faulted in and
  zeroed, then unmapped: a 1M export to Azurite spent 3.8-4.9 CPU-seconds in the kernel
  so, and 1.8-2.0 with the heap (6.8-8.7 CPU-seconds in all against 4.8-5.4).

``MALLOC_ARENA_MAX`` and ``MALLOC_MMAP_THRESHOLD_`` in the environment (or glibc's
``GLIBC_TUNABLES``), read by glibc at start, win.
"""

from __future__ import annotations

import ctypes
import os

ARENAS = 2
MMAP_THRESHOLD = 256 * 1024
SERVICE_MMAP_THRESHOLD = 32 * 1024 * 1024
M_ARENA_MAX = -8  # glibc's malloc.h
M_MMAP_THRESHOLD = -3


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Whether the limit was set: False when the environment sets its own, or the C
    library is not glibc (no ``mallopt``)."""
    return _set(M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max")


def map_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Whether the fixed threshold was set (False as for :func:`limit_arenas`)."""
    return _set(
        M_MMAP_THRESHOLD, threshold, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"
    )


def tune() -> None:
    """Both, for ``serve`` and ``worker``: first thing in the process (before any thread
    starts)."""
    limit_arenas()
    map_large_buffers(SERVICE_MMAP_THRESHOLD)


def _set(option: int, value: int, variable: str, tunable: str) -> bool:
    if variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(option, value))
