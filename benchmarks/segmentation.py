"""kNN label transfer: seconds per scan, against NumPy brute force, scikit-learn and faiss.

kNN labelling of one 128^3 query scan at stride 4 from 9 atlases, descriptors already
    computed (128-d, the demo SmallCNN's width; body points only, as in
    ``medssl.evaluate.knn_seg``): medssl's exact per-atlas search (``backend="exact"``, the
    default: faiss's float32 candidates ranked and certified in float64; ``"torch"``: the same with
    torch's candidates, the default before; ``"sklearn"``, the default before that; faiss
    ``IndexFlatL2`` alone) plus the vote and the upsampling to the image grid, next to a brute-force NumPy
    baseline in the same run (chunked ``|q|^2 - 2 q.a + |a|^2`` over all atlas points at once,
    ``argpartition``, the same vote), with the share of voxels whose label equals
    scikit-learn's. Also: the cost of one more atlas draw once the per-atlas neighbour lists
    exist (merge + vote + upsampling).

Dense descriptors against the bare network, in the same precision: ``benchmarks/dense.py``.

The script sets ``OMP_WAIT_POLICY=PASSIVE`` for itself unless it is set (``benchmarks/dense.py``
says why: spinning OpenMP threads distort timings on a loaded machine).

Run: ``python benchmarks/segmentation.py [--rounds 2] [--size 128]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when torch loads it (benchmarks/dense.py)

import numpy as np
import torch

from medssl.evaluate.dense import DenseEmbedding, dense_grid
from medssl.evaluate.knn_seg import _to_grid, atlas_neighbours, labels_on_image, vote_fractions

D = 128
K = 21
N_ATLASES = 9
N_CLASSES = 7
STRIDE = 4


def _grid(size: int, case: str, rng: np.random.Generator, body: np.ndarray, centres: np.ndarray) -> DenseEmbedding:
    """A dense grid with 128-d descriptors on the body: low-rank signal around per-organ centres + noise."""
    anchors, c_axes = dense_grid((size,) * 3, STRIDE, 32)
    g = tuple(len(a) for a in anchors)
    codes = _organ_codes(size)
    lab = codes[np.ix_(*anchors)].reshape(-1)
    emb = centres[lab] + 0.8 * rng.normal(size=(lab.size, D)).astype(np.float32)
    fg = body[np.ix_(*anchors)]
    emb[~fg.reshape(-1)] = np.nan
    mesh = np.stack(np.meshgrid(*c_axes, indexing="ij"), -1)
    return DenseEmbedding(embeddings=emb.reshape(*g, D).astype(np.float32), centres_vox=mesh, centres_mm=mesh * 1.5,
                          grid_affine=np.eye(4), image_affine=np.diag([1.5, 1.5, 1.5, 1.0]),
                          image_shape_vox=(size,) * 3, stride_vox=(STRIDE,) * 3, patch_size_vox=(32,) * 3,
                          foreground=fg, case_id=case)


def _organ_codes(size: int) -> np.ndarray:
    """Six box organs inside an ellipsoidal body, on a ``size^3`` grid."""
    codes = np.zeros((size,) * 3, np.uint8)
    s = size / 128
    for code, (x, y, z, w) in enumerate([(40, 60, 70, 24), (85, 60, 70, 14), (45, 50, 40, 10), (80, 50, 40, 10),
                                         (55, 40, 20, 8), (70, 40, 20, 8)], start=1):
        sl = tuple(slice(int((c - w) * s), int((c + w) * s)) for c in (x, y, z))
        codes[sl] = code
    return codes


def _body(size: int) -> np.ndarray:
    ijk = np.indices((size,) * 3).astype(np.float32) / (size - 1) * 2 - 1
    return (ijk[0] ** 2 / 0.85 ** 2 + ijk[1] ** 2 / 0.7 ** 2 + ijk[2] ** 2 / 0.95 ** 2) <= 1.0


def _numpy_brute(query: DenseEmbedding, atlases: list[DenseEmbedding], codes: np.ndarray) -> np.ndarray:
    """Brute-force NumPy kNN labelling over all atlas points at once (the baseline)."""
    qi = np.flatnonzero(query.flat_foreground)
    q = query.flat_embeddings[qi]
    db, lab = [], []
    for a in atlases:
        ai = np.flatnonzero(a.flat_foreground)
        db.append(a.flat_embeddings[ai])
        lab.append(codes[np.ix_(*a.anchors_vox)].reshape(-1)[ai])
    db, lab = np.concatenate(db), np.concatenate(lab)
    db_sq = (db * db).sum(1)
    counts = np.zeros((len(q), N_CLASSES), np.float32)
    for s in range(0, len(q), 512):
        d = db_sq[None, :] - 2.0 * q[s : s + 512] @ db.T
        nn_idx = np.argpartition(d, K - 1, axis=1)[:, :K]
        for c in range(N_CLASSES):
            counts[s : s + 512, c] = (lab[nn_idx] == c).sum(1)
    return labels_on_image(query, _to_grid(query, counts / K, qi))


def _label_scan(query, atlases, codes, backend: str) -> tuple[float, float, np.ndarray]:
    """Seconds for the per-atlas search and for merge + vote + upsampling (all 9 atlases), and the labels."""
    t0 = time.perf_counter()
    neigh = atlas_neighbours(query, atlases, [codes] * N_ATLASES, K, backend=backend)
    t1 = time.perf_counter()
    frac = vote_fractions(neigh, range(N_ATLASES), K, N_CLASSES)
    labels = labels_on_image(query, _to_grid(query, frac, neigh.query_index))
    return t1 - t0, time.perf_counter() - t1, labels


def bench_knn(size: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    body = _body(size)
    centres = rng.normal(size=(N_CLASSES, D)).astype(np.float32)
    query = _grid(size, "query", rng, body, centres)
    atlases = [_grid(size, f"atlas{i}", rng, body, centres) for i in range(N_ATLASES)]
    codes = _organ_codes(size)
    n_q = int(query.flat_foreground.sum())
    print(f"(a) kNN labelling: {size}^3 at stride {STRIDE}: {n_q} body query points x {N_ATLASES} atlases x "
          f"{n_q} points, D = {D}, k = {K}; median of {rounds} alternating rounds")
    backends = ["exact", "torch", "sklearn"]
    try:
        import faiss  # noqa: F401

        backends.append("faiss")
    except ImportError:
        print("    (faiss-cpu not installed: no faiss row, and the exact search takes torch's candidates)")
    runs: dict[str, list[tuple[float, float, float, np.ndarray]]] = {b: [] for b in [*backends, "numpy"]}
    for _ in range(rounds):
        for backend in backends:
            c0 = time.process_time()
            search, vote, labels = _label_scan(query, atlases, codes, backend)
            runs[backend].append((search + vote, vote, time.process_time() - c0, labels))
        t0, c0 = time.perf_counter(), time.process_time()
        brute = _numpy_brute(query, atlases, codes)
        runs["numpy"].append((time.perf_counter() - t0, 0.0, time.process_time() - c0, brute))
    med = {b: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v])),
               float(np.median([r[2] for r in v])), v[0][3]) for b, v in runs.items()}
    t_brute = med["numpy"][0]
    ref = med["sklearn"][3]  # the previous default: the labels must not change
    names = {"exact": "medssl exact (default)", "torch": "medssl exact, torch candidates", "sklearn": "scikit-learn brute",
             "faiss": "faiss IndexFlatL2", "numpy": "NumPy brute force (baseline)"}
    for b, (total, _vote, cpu, labels) in med.items():
        print(f"    {names[b]:30s}: {total:6.2f} s per scan (CPU {cpu:5.1f} s)  {t_brute / total:4.1f}x NumPy brute "
              f"force  labels equal to scikit-learn's on {100 * float((labels == ref).mean()):.3f} % of voxels")
    print(f"    merge + vote + upsampling to {size}^3 (one more atlas draw once the neighbour lists exist): "
          f"{med['exact'][1]:.2f} s")


def main() -> None:
    import medssl

    medssl.tune_malloc()  # as the CLI and the notebooks' kernels (Makefile) do
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="volume edge in voxels")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each benchmark")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          "timings on a shared machine vary by 10-30 % or more\n")
    bench_knn(args.size, args.rounds)


if __name__ == "__main__":
    main()
