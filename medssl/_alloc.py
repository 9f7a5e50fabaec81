"""glibc malloc tuning for CPU training.

Large, short-lived activation buffers make glibc return memory to the OS and
re-fault it on every step; on this project's 2-core machine that costs about 2x
on small 3D CNNs (see README, "Performance"). We switch off mmap-backed
allocations and trimming, which is what the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11 MALLOC_TOP_PAD_=1e9`` do, but
from inside the process. ``import medssl`` does not call it: the entry points do (the
``medssl`` command, the pipeline, which also passes :data:`MALLOC_ENV` to its kernels,
the Makefile, which exports the variables) and the training notebooks call
``medssl.tune_malloc()`` explicitly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter ids from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_applied: bool | None = None

# The same settings as environment variables, for child processes (read by glibc at start-up).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000", "MALLOC_TOP_PAD_": "1000000000"}


def tune_malloc() -> bool:
    """Apply the glibc malloc settings once; return True when they were applied.

    A no-op (returning False) off Linux, on non-glibc libcs (musl), or when the
    user set ``MEDSSL_NO_MALLOC_TUNING=1``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("MEDSSL_NO_MALLOC_TUNING") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    # int max is the largest value mallopt accepts; trimming is effectively off
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, 1_000_000_000) == 1
    _applied = bool(ok)
    return _applied
