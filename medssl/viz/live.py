"""Live training curves in a notebook: a plotly ``FigureWidget`` that ``fit`` updates as it logs.

In ``10_pretrain.ipynb``::

    live = LiveCurves(title="isimed (demo preset)")
    display(live.widget)
    fit(model, train, config, method_dir, callbacks=[live])

Every record ``fit`` writes to ``metrics.jsonl`` is passed to the callback (:mod:`medssl.train.loop`),
which appends it to the figure: the training loss and the method's own loss terms, the
validation loss, and the effective rank of the fixed validation embeddings. In a live
JupyterLab the figure grows while the run trains; under papermill (no front end) the widget
is updated all the same and does no harm, and the static figures drawn from ``metrics.jsonl``
afterwards are what the saved notebook shows. For shell and cluster runs, TensorBoard reads the
event files ``fit`` writes beside ``metrics.jsonl`` (``make tensorboard RUN=<run>``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LiveCurves"]


def _is_loss_term(key: str) -> bool:
    return key == "loss" or key.startswith("loss_") or key.endswith("_loss")


class LiveCurves:
    """A training-curve ``FigureWidget`` (``.widget``) fed by ``fit``'s callbacks; never stops training.

    Left: every loss field of the train records (``loss`` and the method's terms, each its own
    line) and the val ``loss``; right: the val ``effective_rank``. Traces for loss terms are
    added the first time a record carries them.
    """

    def __init__(self, title: str = "", height: int = 340) -> None:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                            subplot_titles=("loss (train per record, val)", "effective rank (val patches)"))
        fig.update_layout(title=title or None, height=height, margin={"t": 60, "b": 40, "l": 50, "r": 20},
                          legend={"orientation": "h", "y": -0.2})
        fig.update_xaxes(title_text="step")
        self.widget = go.FigureWidget(fig)
        self._index: dict[str, int] = {}  # trace name -> index in widget.data
        self.n_records = 0

    def _trace(self, name: str, col: int, mode: str) -> int:
        if name not in self._index:
            self.widget.add_scatter(x=[], y=[], name=name, mode=mode, row=1, col=col)
            self._index[name] = len(self.widget.data) - 1
        return self._index[name]

    def __call__(self, record: dict[str, Any]) -> None:
        """Add one ``metrics.jsonl`` record (returns None: a live figure never asks ``fit`` to stop)."""
        step, split = record.get("step", 0), record.get("split", "train")
        if split == "val":
            points = [("val loss", 1, "lines+markers", record.get("loss")),
                      ("val effective rank", 2, "lines+markers", record.get("effective_rank"))]
        else:
            points = [(f"train {k}", 1, "lines", record[k]) for k in sorted(record) if _is_loss_term(k)]
        points = [p for p in points if not isinstance(p[3], bool) and isinstance(p[3], (int, float))
                  and math.isfinite(p[3])]
        indices = [self._trace(name, col, mode) for name, col, mode, _ in points]  # new traces outside the batch
        with self.widget.batch_update():
            for i, (*_, value) in zip(indices, points):
                trace = self.widget.data[i]
                trace.x = (*(trace.x or ()), step)
                trace.y = (*(trace.y or ()), float(value))
        self.n_records += 1
