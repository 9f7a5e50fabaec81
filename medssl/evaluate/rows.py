"""The rows of an evaluation table computed side by side: one single-threaded worker per core.

An evaluation row (one method's dense descriptors, nearest-neighbour search and scores over the held-out
subjects) does not depend on any other row. On a CPU, :func:`map_rows` computes ``workers`` rows at once
in threads, each with ONE torch, OpenMP and BLAS thread, and returns them in the order given. The
small 3D CNNs of the demo do not scale to a second thread, and the parts of a row that are
single-threaded anyway (scoring, registration, search bookkeeping) then use the other core. Measured on this
2-core machine: the demo's kNN cell 252 -> 182 s, its correspondence cell 219 -> 187 s
(``benchmarks/eval_rows.py``: 1.24x for six kNN rows, identical tables).

**Same numbers.** A row is the same computation on one thread as on two: the forward pass of a
convolution or a linear layer splits its work over output elements, not over a sum, so its bits do
not depend on the thread count (checked for every demo method's dense descriptors in
``tests/evaluate/test_rows.py``); the kNN search is exact; the rest is seeded per row. Tables are
assembled in row order, so they are byte-identical to those of a one-row-at-a-time run. Only the wall
times a row reports are those of a row sharing the machine.

Threads, not processes: the models, volumes and the dense-embedding store are shared without copies.
torch releases the GIL inside its kernels, and the thread count is per calling thread in OpenMP, so
each worker sets its own (``torch.set_num_threads(1)`` and ``threadpoolctl``), and the caller's
settings are restored afterwards. A model is never used by two workers at once: each row owns its
method (a row is a method).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["map_rows", "resolve_workers"]

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int | str, n_rows: int, models: Sequence[Any] = ()) -> int:
    """Rows computed at once: ``workers``, or for ``"auto"`` as many single-threaded rows as the caller's torch
    threads (``torch.get_num_threads()``: the cores, unless ``OMP_NUM_THREADS`` or the caller said fewer; at most
    ``n_rows``), and 1 when any model's weights are on a GPU (one device: rows would only queue on it)."""
    if workers != "auto":
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be 'auto' or an integer >= 1, got {workers!r}")
        return min(workers, max(n_rows, 1))
    for m in models:
        params = getattr(m, "parameters", None)
        p = next(params(), None) if callable(params) else None
        if p is not None and p.device.type != "cpu":
            return 1
    import torch

    return max(1, min(torch.get_num_threads(), n_rows))


def map_rows(fn: Callable[[T], R], rows: Sequence[T], workers: int = 1) -> list[R]:
    """``[fn(row) for row in rows]``, ``workers`` rows at a time on single-threaded workers (module doc).

    With ``workers <= 1`` (or one row) it is exactly that list comprehension, on the caller's threads.
    The first exception raised by a row is raised here, after the rows already started have finished.
    """
    rows = list(rows)
    if workers <= 1 or len(rows) <= 1:
        return [fn(r) for r in rows]
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from threadpoolctl import threadpool_limits

    def one(row: T) -> R:
        torch.set_num_threads(1)  # this thread's OpenMP setting, as torch reads it
        with threadpool_limits(1):  # BLAS, and the OpenMP of other libraries (faiss, scikit-learn)
            return fn(row)

    import warnings

    before = torch.get_num_threads()
    try:
        # the caller's limits while the workers run: a worker's threadpoolctl exit restores these, not its own;
        # and the warning filters, which rows change with catch_warnings (not thread-safe) are restored after
        with threadpool_limits(1), warnings.catch_warnings(), \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medssl-row") as pool:
            return list(pool.map(one, rows))
    finally:
        torch.set_num_threads(before)
