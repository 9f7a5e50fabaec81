"""The top-level API: lazy, cheap to import, and free of side effects on the process."""

import os
import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_medssl_loads_no_torch_and_leaves_the_allocator_alone():
    out = _run("import sys, medssl, medssl._alloc as a; print('torch' in sys.modules, a._applied)")
    assert out == "False None"


def test_the_everyday_names_resolve_lazily_to_the_real_objects():
    import medssl
    from medssl.data.source import open_data
    from medssl.methods import list_methods
    from medssl.presets import build_run
    from medssl.rundir import RunDir
    from medssl.train import fit, load_method

    assert medssl.open_data is open_data and medssl.fit is fit and medssl.load_method is load_method
    assert medssl.build_run is build_run and medssl.RunDir is RunDir and medssl.list_methods is list_methods
    assert set(medssl.list_methods()) >= {"isimed", "regisimed", "simclr", "barlowtwins"}
    assert "fit" in dir(medssl)


# Prints the libc, tune_malloc() twice, and how many bytes of a 64 MiB malloc glibc served by mmap
# (mallinfo2's hblkhd; glibc >= 2.33): M_MMAP_MAX=0, the core of the tuning, makes that 0.
_MALLOC_PROBE = """
import ctypes, platform, medssl
first, second = medssl.tune_malloc(), medssl.tune_malloc()
libc_name = platform.libc_ver()[0] or "unknown"
mmapped = -1
if libc_name == "glibc":
    libc = ctypes.CDLL("libc.so.6")
    if hasattr(libc, "mallinfo2"):
        fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                  "keepcost")
        info = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
        libc.mallinfo2.restype = info
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(64 << 20)
        mmapped = libc.mallinfo2().hblkhd - before
        libc.free(block)
print(libc_name, first, second, mmapped)
"""


def _malloc_probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MEDSSL_NO_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True, check=True,
                         env={**clean, **env})  # fmt: skip
    return out.stdout.split()


def test_tune_malloc_is_one_explicit_call_that_takes_effect_on_glibc():
    """On glibc it must apply (True) and work: a large block no longer comes from mmap. Elsewhere: False."""
    libc_name, first, second, mmapped = _malloc_probe()  # MALLOC_* variables removed: only mallopt acts
    if libc_name != "glibc":
        assert (first, second) == ("False", "False")  # a no-op off glibc, and says so
        return
    assert (first, second) == ("True", "True")  # idempotent
    if int(mmapped) >= 0:  # glibc >= 2.33 reports it
        assert int(mmapped) == 0, f"{mmapped} bytes of a 64 MiB block were mmapped after tune_malloc()"
        _, off_first, off_second, off_mmapped = _malloc_probe(MEDSSL_NO_MALLOC_TUNING="1")
        assert (off_first, off_second) == ("False", "False")
        assert int(off_mmapped) >= 64 << 20  # the probe can tell: untuned glibc serves it by mmap
