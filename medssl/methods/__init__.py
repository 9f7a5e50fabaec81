"""SSL methods, registered by name. ``create_method("isimed", **overrides)``."""

from medssl.methods.base import (
    Method,
    MethodConfig,
    StepOutput,
    create_method,
    get_method_class,
    list_methods,
    make_config,
    register_method,
)

# Built-in methods register themselves on import. Keep this list in roadmap order.
from medssl.methods import isimed, regisimed, simclr, barlowtwins  # noqa: E402,F401

__all__ = ["Method", "MethodConfig", "StepOutput", "create_method", "get_method_class", "list_methods", "make_config", "register_method"]
