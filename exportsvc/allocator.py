"""The C allocator's arenas, limited for the long-running commands (serve, worker).

glibc gives every thread that allocates while another does an arena of its own, up to
eight per core, and memory freed in an arena mostly stays in it. The service's threads
(the event loop, the database thread, the file and upload threads) each pass import
blocks and export pages through their own, so a long job's peak RSS grows with the
number of arenas it filled, not with what it holds: a 1M-resource import peaked at
279-283 MB with the default and at 254 MB with two arenas, in the same time.
``MALLOC_ARENA_MAX`` in the environment, read by glibc at start, wins.
"""

from __future__ import annotations

import ctypes
import os

ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Whether the limit was set: False when the environment sets its own, or the C
    library is not glibc (no ``mallopt``)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_ARENA_MAX, arenas))
