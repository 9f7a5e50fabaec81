"""When worker processes can be started without re-running the caller's script.

medssl starts workers with ``spawn`` (the parent may hold torch/OpenMP threads that
``fork`` would copy in a locked state). A spawned child imports the parent's main
module again: a notebook, ``python -c`` or a REPL have none to import, and a script
keeps its work under ``if __name__ == "__main__":``, which the child skips. A plain
script that calls medssl at top level would be run again in every child, and the
pool breaks (``BrokenProcessPool``); there the work must stay in-process.
"""

from __future__ import annotations

import ast
import sys
from types import FrameType

__all__ = ["can_spawn_workers"]


def can_spawn_workers() -> bool:
    """True if ``spawn``-started workers would not re-run the code that is calling us now.

    Looks for the main module's top-level frame on the call stack and checks whether
    the line it is executing lies inside an ``if __name__ == "__main__":`` block of the
    main file. Unknown cases (unparsable source) count as unsafe.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        return True  # notebook kernel, python -c, REPL: spawn imports no main module
    frame = _outermost_main_frame(main.__dict__)
    if frame is None:
        return True  # the main module's own code is not what is calling us
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return False
    line = frame.f_lineno
    return any(node.lineno <= line <= (node.end_lineno or node.lineno) for node in tree.body if _is_main_guard(node))


def _outermost_main_frame(main_globals: dict) -> FrameType | None:
    frame, found = sys._getframe(1), None
    while frame is not None:
        if frame.f_globals is main_globals and frame.f_code.co_name == "<module>":
            found = frame
        frame = frame.f_back
    return found


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    consts = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and consts == ["__main__"]
