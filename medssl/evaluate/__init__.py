"""Evaluation: frozen embeddings and the evaluation protocols (which split chooses, which scores: ``protocol``).

Pure functions over embeddings and labels that return tables (pandas DataFrames or
dataclasses); the notebooks show and plot them. Modules:

- ``patchsets``: seeded evaluation patch sets, drawn once per seed and reused by every method.
- ``embed``: frozen embedding extraction (eval mode, no-grad, BatchNorm untouched) and its cache.
- ``fidelity``: latent versus physical distances (ISImed Fig. 1).
- ``latent``: PCA/UMAP frames, coordinate decoding, PC-axis correlation, collapse (ISImed Fig. 2).
- ``probe``: subject-grouped linear-probe patch classification (ISImed Table 1).
- ``stats``: paired t-test / Wilcoxon between methods on the same folds.
- ``runs``: loading a run's trained methods (the layout is :class:`medssl.rundir.RunDir`).
- ``dense``, ``correspondence``, ``maps``: dense grids, correspondence, latent maps.
- ``registration``: intensity registration between subjects (the positive control of correspondence and kNN).
- ``knn_seg``: kNN few-shot organ label transfer from dense descriptors.
- ``finetune``: segmentation fine-tuning from a pretrained encoder (networks: :mod:`medssl.models.segmentation`).
- ``segmetrics``: foreground-only per-volume Dice and surface Dice.
- ``iou_intervals``: what IoU-interval crop pairs contain, and the IoU-interval methods' training (notebook 15).
- ``protocol``: which subjects an evaluation chooses on and which it scores.
- ``headlines``: the long headline tables every step writes for the report.
- ``summary``: a short summary of a pretraining run on held-out subjects.
- ``study``: a study's tables over seeds, with intervals and paired comparisons.

(Effective rank and collapse live in :mod:`medssl.capacity`, which methods and training use too.)
"""

from __future__ import annotations

from medssl._lazy import lazy_attributes

# The everyday names, loaded on first use so that importing one module of this package (say ``summary``) does not
# load every other one (the probe's scikit-learn, UMAP).
_EXPORTS = {
    "embed": "EmbeddingCache embed_methods embed_patches frozen model_fingerprint",
    "fidelity": "FidelityResult distance_fidelity fidelity_table method_fidelity metric_latent within_volume_pairs",
    "latent": "collapse_coefficient collapse_stats decode_coordinates pc_axis_correlation pca_frame umap_frame",
    "patchsets": "PatchSet draw_by_split draw_labelled_patch_set draw_pair_set draw_uniform_patch_set get_or_draw "
                 "target_mask",
    "probe": "CONTROL METRICS ProbeComparison ProbeResult auc_by_stratum binary_metrics control_verdict "
             "dominant_instance grouped_folds has_target linear_probe linear_probe_cv position_features "
             "probe_frozen_backbone probe_methods raw_intensity_features share_bin_names share_strata "
             "supervised_control target_patches",
    "runs": "RANDOM_INIT load_run_methods random_init_like",
    "stats": "holm min_wilcoxon_p paired_tests pvalue_matrix",
}
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names.split()}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
