"""The names of the registered methods without importing them (for ``medssl --help``).

Listing the methods means importing ``medssl.methods``, and with it torch: 1.3 s of the 1.75 s that
``medssl --help`` took on the 2-core machine. The names depend only on the modules in the methods
package (every module there registers its methods and variants when imported), so they are kept, like
bytecode, in the package's ``__pycache__`` and reused while the package's files (names, sizes and
modification times) are the ones they were read from. A new, changed or removed method file makes the
next call import the package again and rewrite the list; a folder that cannot be written is no error
(the list is then computed every time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_INDEX_FILE = "medssl_method_names.json"


def _methods_dir() -> Path:
    return Path(__file__).resolve().parent / "methods"


def _fingerprint(folder: Path) -> list[list]:
    """Name, size and modification time of every module of the package: its ``.py`` files and the files of
    its subpackages (``pkgutil.iter_modules`` imports both)."""
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            out += [[f"{entry.name}/{f[0]}", *f[1:]] for f in _fingerprint(Path(entry.path))]
        elif entry.name.endswith(".py"):
            st = entry.stat()
            out.append([entry.name, st.st_size, st.st_mtime_ns])
    return out


def method_names() -> list[str]:
    """``medssl.methods.list_methods()``, from the index when the methods package has not changed."""
    folder = _methods_dir()
    index = folder / "__pycache__" / _INDEX_FILE
    key = _fingerprint(folder)
    try:
        saved = json.loads(index.read_text(encoding="utf-8"))
        if saved.get("files") == key and isinstance(saved.get("methods"), list):
            return [str(m) for m in saved["methods"]]
    except (OSError, ValueError, AttributeError):
        pass  # no index yet, or an unreadable one: list them the slow way
    from medssl.methods import list_methods

    names = list(list_methods())
    try:
        from medssl._files import atomic_write_text

        index.parent.mkdir(exist_ok=True)
        atomic_write_text(index, json.dumps({"files": key, "methods": names}))
    except OSError:
        pass  # a read-only installation: correct, only slower
    return names
