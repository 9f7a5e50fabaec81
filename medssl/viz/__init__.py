"""Viewers and figures, drawn from what ``evaluate`` and ``train`` return (nothing here computes a result).

- ``slices``: orthogonal slices of a volume with organ and lesion overlays, and an interactive slice viewer.
- ``training``: loss, collapse, effective-rank and realised-IoU curves from ``metrics.jsonl``.
- ``live``: the training-curve widget ``fit`` updates while it trains (``10_pretrain.ipynb``).
- ``latent_figures``: figures of the latent-space tables (fidelity, PCA/UMAP scatters, decoding, probe).
- ``map_figures``: figures of latent coordinate maps and cross-subject correspondence.
- ``segmentation``: Dice curves, per-organ bars, fine-tuning learning curves, label overlays.
- ``intervals``: the IoU-interval study's figures (shared-organ fraction, realised IoU, collapse).
- ``viewers``, ``linked``, ``query``: interactive latent-map viewers (NiiVue, plotly) and their widget-free logic.
- ``mapping``: ``medssl map``, a checkpoint and any scan in, a latent coordinate map on the scan's grid out.
- ``html``: the self-contained HTML report writer (tables, plotly figures, images in one file).

Submodules are imported by name (``from medssl.viz import slices``); this package imports none of them,
so that building the ``medssl map`` parser loads no plotting library.
"""
