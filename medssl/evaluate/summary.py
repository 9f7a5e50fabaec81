"""A short, honest summary of a pretraining run on held-out subjects."""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd
from torch import nn

from medssl.data.volume import Volume
from medssl.evaluate.embed import embed_patches
from medssl.evaluate.fidelity import distance_fidelity, metric_latent
from medssl.evaluate.latent import collapse_stats
from medssl.evaluate.patchsets import draw_uniform_patch_set, get_or_draw
from medssl.rundir import RunDir


def pretraining_summary(
    method: nn.Module,
    volumes: Sequence[Volume],
    *,
    seed: int = 0,
    n_per_volume: int = 64,
    run: "str | os.PathLike | RunDir | None" = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One-row table: distance fidelity and collapse statistics of ``method`` on ``volumes``.

    ``volumes`` should be the **validation** subjects: this summary is what one looks at to
    choose settings (scale, steps), so it must not touch the test split. The patch set is seeded and,
    when ``run`` (a run name, folder or :class:`~medssl.rundir.RunDir`) is given, saved once in the run's
    ``eval/`` folder so every method of the run is summarised on identical patches.

    Columns: ``method``, ``n_volumes``, ``n_patches``, ``spearman``, ``pearson`` (latent vs
    physical distance over within-volume pairs), ``abs_err_median_mm``/``abs_err_p90_mm``
    (metric latents only, e.g. ISImed), ``effective_rank`` and ``used_dim_fraction``.
    """
    if not volumes:
        raise ValueError("pretraining_summary needs at least one held-out volume")
    kwargs = dict(volumes=list(volumes), n_per_volume=n_per_volume,
                  patch_size_vox=method.patch_size_vox, foreground_only=True)
    if run is not None:
        patches = get_or_draw(RunDir(run).eval_dir, "summary_uniform", seed, draw_uniform_patch_set, **kwargs)
    else:
        patches = draw_uniform_patch_set(seed=seed, **kwargs)
    emb = embed_patches(method, patches, progress=progress, volumes=volumes)  # a method may cut its own input
    latent, scale_mm = metric_latent(method, emb)
    fid = distance_fidelity(latent, patches.centres_mm, patches.case_ids, scale_mm=scale_mm, seed=seed).summary
    col = collapse_stats(emb)
    return pd.DataFrame([{
        "method": getattr(method, "registry_name", None) or getattr(method, "name", type(method).__name__),
        "n_volumes": len(volumes),
        "n_patches": len(emb),
        "spearman": fid["spearman"],
        "pearson": fid["pearson"],
        "abs_err_median_mm": fid["abs_err_median_mm"],
        "abs_err_p90_mm": fid["abs_err_p90_mm"],
        "effective_rank": col["effective_rank"],
        "used_dim_fraction": col["used_dim_fraction"],
    }])
