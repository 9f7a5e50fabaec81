"""SSL methods, registered by name. ``create_method("isimed", **overrides)``.

Every module in this package is imported here, and each registers its methods with
``@register_method`` (and variants with ``register_variant``): a new method is a new
file, with no edit to this one.
"""

import importlib
import pkgutil

from medssl.methods.base import (
    FAMILIES,
    Method,
    MethodConfig,
    StepOutput,
    create_method,
    get_method_class,
    list_methods,
    make_config,
    method_info,
    register_method,
    register_variant,
)

_SUPPORT_MODULES = {"base", "two_view"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _SUPPORT_MODULES and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FAMILIES", "Method", "MethodConfig", "StepOutput", "create_method", "get_method_class", "list_methods",
    "make_config", "method_info", "register_method", "register_variant",
]
