"""Package attributes that import their module on first use (PEP 562), shared by the package inits.

``import medssl.methods`` must not pull in the train loop, scikit-learn or MONAI (``tests/test_structure.py``),
yet ``from medssl.evaluate import holm`` should work: each package lists its public names and the submodule
that defines them, and the first access imports that submodule and keeps the value.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, modules: Mapping[str, str], namespace: dict[str, Any],
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``modules`` maps each public name to its module, absolute
    (``"medssl.train"``) or relative to the package (``"loop"``); ``namespace`` is the package's ``globals()``."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = module if module.startswith("medssl") else f"{package}.{module}"
        value = getattr(importlib.import_module(target), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace.get("__all__", ())) | set(namespace))

    return __getattr__, __dir__
