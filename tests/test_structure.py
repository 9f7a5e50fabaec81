"""The package's layers: lower folders never import upper ones, folders form no import cycle, and the
method registry and the command line start without the heavy libraries (issue 19 item 2, issue 18 item 3).

Imports are read from the source with ``ast``, function-level imports included (a lazy import is still an
arrow). Layers, lowest first: the base modules (``_files``, ``geometry``, ``capacity``, ...), ``data``, then
``augment*``, ``losses``, ``models``, ``sampling``, then ``methods``, then ``rundir``/``train``/``presets``,
``evaluate``, ``viz``, and the entry points (``pretraining``, ``select``, ``study``, ``pipeline``, ``report``,
``export``, ``cli``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "medssl"

# folders whose modules must not import from the folders named (the arrows that made `import medssl.methods` heavy)
LOWER = ("losses", "models", "sampling", "methods")
UPPER = ("train", "evaluate", "viz", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported medssl module, line)`` for every import in the file, at any depth (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "medssl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "medssl":
                continue
            for alias in node.names:  # `from medssl import paths` imports the module medssl.paths
                sub = f"{target}.{alias.name}"
                is_module = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (PKG.parent / Path(*sub.split("."))).is_dir()
                out.append((sub if is_module else target, node.lineno))
    return out


def _folder(module: str) -> str:
    """``medssl.train.loop`` -> ``train``; a top-level module is its own node (``medssl.cli`` -> ``cli``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medssl"


def _all_imports() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    # the reader itself: a lazy import inside a function and `from medssl import <module>` are arrows too
    f = PKG / "methods" / "_probe_for_test.py"
    try:
        f.write_text("def g():\n    from medssl.train.loop import fit\n    from medssl import paths\n")
        assert ("medssl.train.loop", 2) in _imports(f) and ("medssl.paths", 3) in _imports(f)
    finally:
        f.unlink()


def test_no_module_in_losses_models_sampling_or_methods_imports_train_evaluate_viz_or_cli():
    bad = []
    for module, imports in _all_imports().items():
        if _folder(module) not in LOWER:
            continue
        for target, line in imports:
            if _folder(target) in UPPER:
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_folders_form_no_import_cycle():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for module, imports in _all_imports().items():
        a = _folder(module)
        for target, line in imports:
            b = _folder(target)
            if a != b and b != "medssl":  # `medssl` itself (__version__, the lazy names) imports nothing
                graph[a].add(b)
                where.setdefault((a, b), f"{module}:{line} -> {target}")
    # depth-first search for a back edge; report the cycle with one import per arrow
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cyc = stack[stack.index(m):] + [m]
                cycles.append(" ; ".join(where[(x, y)] for x, y in zip(cyc, cyc[1:])))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles between folders:\n" + "\n".join(cycles)


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


HEAVY = ("sklearn", "scipy", "umap", "monai", "pandas", "matplotlib", "medssl.train", "medssl.evaluate",
         "medssl.viz")


def _loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_import_medssl_methods_loads_no_sklearn_scipy_monai_or_train_loop():
    modules = _modules_loaded_by("import medssl.methods as m; assert 'isimed' in m.list_methods()")
    assert "medssl.methods.isimed" in modules and "torch" in modules  # the registry is really loaded
    assert not _loaded(modules, HEAVY), _loaded(modules, HEAVY)


def test_medssl_help_builds_every_command_without_the_heavy_libraries():
    code = ("import contextlib, io\nfrom medssl.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        main(['--help'])\n    except SystemExit:\n"
            "        pass\nassert 'isimed' in buf.getvalue() and 'pipeline' in buf.getvalue()")
    modules = _modules_loaded_by(code)
    assert {"medssl.viz.mapping", "medssl.export", "medssl.report", "medssl.pipeline"} <= modules  # parsers built
    heavy = ("sklearn", "scipy", "umap", "monai", "matplotlib", "medssl.train.loop", "medssl.evaluate", "medssl.study")
    assert not _loaded(modules, heavy), _loaded(modules, heavy)


@pytest.mark.parametrize("command", ["map", "export", "report", "pipeline", "train", "sweep", "data"])
def test_every_command_has_its_parser(command):
    from medssl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert command in sub.choices


def test_medssl_help_imports_no_torch_once_the_method_index_is_written():
    code = ("import contextlib, io\nfrom medssl.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        main(['--help'])\n    except SystemExit:\n"
            "        pass\nassert 'isimed' in buf.getvalue() and 'simsiam-iou-0-1' in buf.getvalue()")
    _modules_loaded_by(code)  # writes the index if the methods package changed since it was written
    assert "torch" not in _modules_loaded_by(code)


def test_the_method_index_is_rewritten_when_a_method_file_changes(tmp_path, monkeypatch):
    import medssl.methods
    from medssl import _method_index

    (tmp_path / "mine.py").write_text("# a method\n", encoding="utf-8")
    monkeypatch.setattr(_method_index, "_methods_dir", lambda: tmp_path)
    monkeypatch.setattr(medssl.methods, "list_methods", lambda: ["first"])
    assert _method_index.method_names() == ["first"]
    monkeypatch.setattr(medssl.methods, "list_methods", lambda: ["second"])
    assert _method_index.method_names() == ["first"]  # the package did not change: the index answers
    (tmp_path / "mine.py").write_text("# a method, edited\n", encoding="utf-8")
    assert _method_index.method_names() == ["second"]
    (tmp_path / "other.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(medssl.methods, "list_methods", lambda: ["third"])
    assert _method_index.method_names() == ["third"]  # a new file
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(medssl.methods, "list_methods", lambda: ["fourth"])
    assert _method_index.method_names() == ["fourth"]  # a new subpackage's module


def test_a_method_index_that_cannot_be_written_or_read_still_lists_the_methods(tmp_path, monkeypatch):
    import medssl._files
    import medssl.methods
    from medssl import _method_index

    (tmp_path / "mine.py").write_text("# a method\n", encoding="utf-8")
    monkeypatch.setattr(_method_index, "_methods_dir", lambda: tmp_path)
    monkeypatch.setattr(medssl.methods, "list_methods", lambda: ["mine"])

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(medssl._files, "atomic_write_text", read_only)
    assert _method_index.method_names() == ["mine"]  # an installation whose package folder is read-only
    assert not (tmp_path / "__pycache__" / "medssl_method_names.json").exists()
    monkeypatch.undo()
    monkeypatch.setattr(_method_index, "_methods_dir", lambda: tmp_path)
    monkeypatch.setattr(medssl.methods, "list_methods", lambda: ["mine"])
    (tmp_path / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "__pycache__" / "medssl_method_names.json").write_text("{not json", encoding="utf-8")
    assert _method_index.method_names() == ["mine"]  # a damaged index is read past and rewritten
    assert "mine" in (tmp_path / "__pycache__" / "medssl_method_names.json").read_text(encoding="utf-8")
