"""pretraining_figures: loss curves always; collapse, effective rank and IoU figures when the columns exist."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medssl.sampling.iou_pairs import iou_histogram_logs
from medssl.viz.training import pretraining_figures


def _metrics(simsiam: bool) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for step in range(10, 110, 10):
        row = {"split": "train", "step": step, "loss": -step / 110, "lr": 0.01}
        if simsiam:
            row |= {"collapse_z": 0.1, "collapse_p": 0.2, "fallback_rate": 0.01,
                    **iou_histogram_logs(rng.uniform(0.3, 0.6, size=50))}
        rows.append(row)
    rows += [{"split": "val", "step": s, "loss": -0.5, "effective_rank": 10.0 + s / 10} for s in (0, 50, 100)]
    return pd.DataFrame(rows)


def test_every_method_gets_loss_curves_and_simsiam_also_collapse_rank_and_iou_figures():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    plain = pretraining_figures(_metrics(False).drop(index=[10, 11, 12]))
    assert [t for t, _ in plain] == ["Loss curves"]
    figs = pretraining_figures(_metrics(True), title="simsiam")
    assert [t for t, _ in figs] == ["Loss curves", "Collapse coefficient", "Effective rank (val)",
                                    "Realised IoU and fallback rate"]
    assert all(isinstance(f, Figure) for _, f in figs)
    bars = figs[-1][1].axes[0].patches
    heights = np.array([b.get_height() for b in bars])
    assert len(bars) == 11 and abs(heights.sum() - 1) < 1e-9
    assert heights[4:7].sum() == 1.0  # [0.3, 0.6] lands in bins 0.3-0.4, 0.4-0.5, 0.5-0.6 (after '0' and 0.0-0.1 ...)
    for _, f in plain + figs:
        plt.close(f)


def test_collapse_measured_only_on_validation_is_plotted_for_z_and_h():
    """SimSiam logs collapse_z (before the projector's last BatchNorm) and collapse_h on val only: still a figure."""
    import matplotlib.pyplot as plt

    metrics = _metrics(False)
    metrics.loc[metrics.split == "val", "collapse_z"] = [0.9, 0.5, 0.2]
    metrics.loc[metrics.split == "val", "collapse_h"] = [1.0, 0.6, 0.3]
    figs = pretraining_figures(metrics)
    assert [t for t, _ in figs] == ["Loss curves", "Collapse coefficient", "Effective rank (val)"]
    ax = figs[1][1].axes[0]
    plotted = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert plotted["z on val"] == [0.9, 0.5, 0.2] and plotted["h on val"] == [1.0, 0.6, 0.3]
    for _, f in figs:
        plt.close(f)
