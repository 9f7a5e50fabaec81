"""Worker processes: when they can be started without re-running the caller's script, and dying with their parent.

medssl starts workers with ``spawn`` (the parent may hold torch/OpenMP threads that
``fork`` would copy in a locked state). A spawned child imports the parent's main
module again: a notebook, ``python -c`` or a REPL have none to import, and a script
keeps its work under ``if __name__ == "__main__":``, which the child skips. A plain
script that calls medssl at top level would be run again in every child, and the
pool breaks (``BrokenProcessPool``); there the work must stay in-process.

A parent killed with SIGKILL cannot stop its workers, and a pool's workers do not notice
on their own: they finish their case and may wait on the pool's queue for ever.
:func:`die_with_parent`, called first thing in a worker, ends it when its parent ends.
"""

from __future__ import annotations

import ast
import ctypes
import os
import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["can_spawn_workers", "die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_INTERVAL_S = 0.5


def die_with_parent(parent_pid: int, use_prctl: bool = True) -> str:
    """End this process as soon as ``parent_pid`` (its parent) has ended, however it ended.

    On Linux the kernel sends SIGKILL to this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG)``, through ctypes: no dependency). Elsewhere, or if that
    call fails, a daemon thread checks every :data:`WATCHDOG_INTERVAL_S` s whether the
    process was handed to another parent (orphans are re-parented) and exits then. A
    parent that died before either was set up is caught by checking once now.

    Returns how: ``"pdeathsig"`` or ``"watchdog"`` (``use_prctl=False``: always the watchdog).
    """
    how = "watchdog"
    if use_prctl and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "pdeathsig"
        except (OSError, AttributeError):  # no libc symbol: fall back to the watchdog
            pass
    if os.getppid() != parent_pid:  # the parent is already gone
        os._exit(1)
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="medssl-parent-watchdog", daemon=True).start()
    return how


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCHDOG_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: the parent's next build removes what this worker left


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
