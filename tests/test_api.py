"""The top-level API: lazy, cheap to import, and free of side effects on the process."""

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
    from medssl.pretraining import pretrain

    assert medssl.pretrain is pretrain  # a function, not the module (which is named pretraining for that reason)
    assert set(medssl.list_methods()) >= {"isimed", "regisimed", "simclr", "barlowtwins"}
    assert "fit" in dir(medssl)


def test_tune_malloc_is_one_explicit_call():
    out = _run("import medssl; print(medssl.tune_malloc(), medssl.tune_malloc())")
    assert out in ("True True", "False False")  # idempotent; False off glibc
