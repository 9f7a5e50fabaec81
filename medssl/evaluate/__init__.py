"""Evaluation: frozen embeddings and the protocols of design/evaluation.md.

Pure functions over embeddings and labels that return tables (pandas DataFrames or
dataclasses); the notebooks show and plot them. Modules:

- ``patchsets``: seeded evaluation patch sets, drawn once per seed and reused by every method.
- ``embed``: frozen embedding extraction (eval mode, no-grad, BatchNorm untouched) and its cache.
- ``fidelity``: latent versus physical distances (ISImed Fig. 1).
- ``latent``: PCA/UMAP frames, coordinate decoding, PC-axis correlation, collapse (ISImed Fig. 2).
- ``probe``: subject-grouped linear-probe patch classification (ISImed Table 1).
- ``stats``: paired t-test / Wilcoxon between methods on the same folds.
- ``runs``: loading a run's trained methods (the layout is :class:`medssl.rundir.RunDir`).
- ``rank``, ``dense``, ``correspondence``, ``maps``: capacity, dense grids, correspondence, latent maps.
"""

from medssl.evaluate.embed import EmbeddingCache, embed_methods, embed_patches, frozen, model_fingerprint
from medssl.evaluate.fidelity import (
    FidelityResult,
    distance_fidelity,
    fidelity_table,
    method_fidelity,
    metric_latent,
    within_volume_pairs,
)
from medssl.evaluate.latent import (
    collapse_coefficient,
    collapse_stats,
    decode_coordinates,
    pc_axis_correlation,
    pca_frame,
    umap_frame,
)
from medssl.evaluate.patchsets import (
    PatchSet,
    draw_by_split,
    draw_labelled_patch_set,
    draw_pair_set,
    draw_uniform_patch_set,
    get_or_draw,
    target_mask,
)
from medssl.evaluate.probe import (
    CONTROL,
    METRICS,
    ProbeComparison,
    ProbeResult,
    auc_by_stratum,
    binary_metrics,
    control_verdict,
    dominant_instance,
    grouped_folds,
    has_target,
    linear_probe,
    linear_probe_cv,
    position_features,
    probe_frozen_backbone,
    probe_methods,
    raw_intensity_features,
    share_bin_names,
    share_strata,
    supervised_control,
    target_patches,
)
from medssl.evaluate.rank import dim_variance_fraction, effective_rank
from medssl.evaluate.runs import RANDOM_INIT, load_run_methods, random_init_like
from medssl.evaluate.stats import holm, min_wilcoxon_p, paired_tests, pvalue_matrix

__all__ = [
    "EmbeddingCache", "embed_methods", "embed_patches", "frozen", "model_fingerprint",
    "FidelityResult", "distance_fidelity", "fidelity_table", "method_fidelity", "metric_latent", "within_volume_pairs",
    "collapse_coefficient", "collapse_stats", "decode_coordinates", "pc_axis_correlation", "pca_frame", "umap_frame",
    "PatchSet", "draw_by_split", "draw_labelled_patch_set", "draw_pair_set", "draw_uniform_patch_set", "get_or_draw",
    "target_mask",
    "METRICS", "ProbeComparison", "ProbeResult", "binary_metrics", "grouped_folds", "linear_probe", "linear_probe_cv",
    "position_features", "probe_frozen_backbone", "probe_methods", "raw_intensity_features",
    "CONTROL", "auc_by_stratum", "control_verdict", "share_strata", "supervised_control",
    "dominant_instance", "share_bin_names", "has_target",
    "target_patches",
    "dim_variance_fraction", "effective_rank",
    "RANDOM_INIT", "load_run_methods", "random_init_like",
    "holm", "min_wilcoxon_p", "paired_tests", "pvalue_matrix",
]
