"""A cache builder process for tests/data/test_cache_concurrency.py.

Usage: ``python _cache_builder.py CACHE_ROOT MANIFEST_CSV MARKER hold|run``

With ``hold`` it pauses once its first case is staged (in the main process, where the
results of the worker processes arrive): it creates ``MARKER.staged`` and waits until
``MARKER.go`` exists. It prints the build's built/reused case ids as JSON.
``CACHE_BUILDER_WORKERS`` sets the number of worker processes (default 1).
``CACHE_BUILDER_FSIZE`` (bytes) limits the size of every file it writes (a write beyond
it fails like on a full disk); a CacheWriteError is then printed as JSON and the exit
code is 3. ``CACHE_BUILDER_NATIVE=1`` keeps the native spacing (bigger entries).
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import pandas as pd

from medssl.data import cache as cache_module
from medssl.data.preprocess import PreprocessConfig

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for a stack dump if this hangs
# Ctrl-C raises KeyboardInterrupt as in a terminal, even if the test runner (an xdist worker) ignores SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
root, manifest, marker, mode = sys.argv[1:5]
if mode == "hold":
    real_unpack = cache_module._unpack_stage_result
    held = []

    def _unpack_and_hold(result):
        if not held:
            held.append(True)
            Path(marker + ".staged").touch()
            while not Path(marker + ".go").exists():
                time.sleep(0.05)
        return real_unpack(result)

    cache_module._unpack_stage_result = _unpack_and_hold

spacing = None if os.environ.get("CACHE_BUILDER_NATIVE") else (2.0, 2.0, 2.0)
cache = cache_module.VolumeCache(root, PreprocessConfig(target_spacing_mm=spacing))
df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
if os.environ.get("CACHE_BUILDER_FSIZE"):
    limit = int(os.environ["CACHE_BUILDER_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG
try:
    report = cache.build(df, progress=False, workers=int(os.environ.get("CACHE_BUILDER_WORKERS", "1")))
except cache_module.CacheWriteError as e:
    print(json.dumps({"type": type(e).__name__, "path": e.path, "problem": e.problem}))
    sys.exit(3)
print(json.dumps({"built": report.built_case_ids, "reused": report.reused_case_ids}))
