"""kNN label transfer and dense descriptors: seconds per scan and descriptors per second.

(a) kNN labelling of one 128^3 query scan at stride 4 from 9 atlases, descriptors already
    computed (128-d, the demo SmallCNN's width; body points only, as in
    ``medssl.evaluate.knn_seg``): medssl's exact per-atlas search (scikit-learn, and faiss
    ``IndexFlatL2`` when faiss-cpu is installed) plus the vote and the upsampling to the image grid, next to a brute-force
    NumPy baseline in the same run (chunked ``|q|^2 - 2 q.a + |a|^2`` over all atlas points
    at once, ``argpartition``, the same vote). Also: the cost of one more atlas draw once the
    per-atlas neighbour lists exist (merge + vote + upsampling).
(b) Dense descriptors of a 128^3 volume at stride 4 (32,768 patches of 32^3) with the demo
    ISImed network: ``dense_embeddings`` (precision "auto": bf16 where the CPU has it, and
    fp32) next to the bare network in eval mode (fp32, no-grad, batches of 256 pre-made
    patches) on the same number of patches. Rounds alternate the three so that other load
    on the machine hits them alike; the median round is reported.

Run: ``python benchmarks/segmentation.py [--rounds 2] [--size 128]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.evaluate.dense import DenseEmbedding, dense_embeddings, dense_grid
from medssl.evaluate.knn_seg import _to_grid, atlas_neighbours, labels_on_image, vote_fractions
from medssl.methods import create_method
from medssl.train.precision import resolve_precision

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


def bench_knn(size: int) -> None:
    rng = np.random.default_rng(0)
    body = _body(size)
    centres = rng.normal(size=(N_CLASSES, D)).astype(np.float32)
    query = _grid(size, "query", rng, body, centres)
    atlases = [_grid(size, f"atlas{i}", rng, body, centres) for i in range(N_ATLASES)]
    codes = _organ_codes(size)
    n_q = int(query.flat_foreground.sum())
    print(f"(a) kNN labelling: {size}^3 at stride {STRIDE}: {n_q} body query points x {N_ATLASES} atlases x "
          f"{n_q} points, D = {D}, k = {K}")
    results = {}
    backends = ["sklearn"]
    try:
        import faiss  # noqa: F401

        backends.append("faiss")
    except ImportError:
        print("    (faiss-cpu not installed: scikit-learn only)")
    for backend in backends:
        t0 = time.perf_counter()
        neigh = atlas_neighbours(query, atlases, [codes] * N_ATLASES, K, backend=backend)
        t1 = time.perf_counter()
        frac = vote_fractions(neigh, range(N_ATLASES), K, N_CLASSES)
        labels = labels_on_image(query, _to_grid(query, frac, neigh.query_index))
        t2 = time.perf_counter()
        results[backend] = (t2 - t0, t2 - t1, labels)
    t0 = time.perf_counter()
    brute = _numpy_brute(query, atlases, codes)
    t_brute = time.perf_counter() - t0
    for backend, (total, _draw, labels) in results.items():
        agree = float((labels == brute).mean())
        print(f"    medssl per-atlas exact kNN ({backend:7s}): {total:6.1f} s per scan  "
              f"({t_brute / total:4.1f}x faster than NumPy brute force; labels agree on {100 * agree:.2f} % of voxels)")
    print(f"    NumPy brute force (baseline)          : {t_brute:6.1f} s per scan")
    print(f"    one more atlas draw (merge + vote + upsampling to {size}^3): {results['sklearn'][1]:.2f} s")


def bench_dense(size: int, rounds: int) -> None:
    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=32).eval()  # the demo ISImed network
    rng = np.random.default_rng(1)
    vol = Volume(data=rng.normal(size=(1, size, size, size)).astype(np.float32), affine=np.eye(4), case_id="bench")
    n = int(np.prod([len(a) for a in dense_grid(vol.shape_vox, STRIDE, 32)[0]]))
    patches = torch.from_numpy(rng.normal(size=(256, 1, 32, 32, 32)).astype(np.float32))
    auto = resolve_precision("auto", torch.device("cpu"))

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, n, 256):
                method.embed(patches[: min(256, n - s)])
        return time.perf_counter() - t0

    def dense(precision: str) -> float:
        t0 = time.perf_counter()
        dense_embeddings(method, vol, STRIDE, precision=precision, progress=False)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"bare network, fp32": [], f"dense_embeddings, {auto} (auto)": [],
                                     "dense_embeddings, fp32": []}
    for _ in range(rounds):
        times["bare network, fp32"].append(bare())
        times[f"dense_embeddings, {auto} (auto)"].append(dense("auto"))
        times["dense_embeddings, fp32"].append(dense("fp32"))
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["bare network, fp32"]
    print(f"\n(b) dense descriptors: {size}^3 volume at stride {STRIDE} = {n} patches of 32^3, demo ISImed network "
          f"(median of {rounds} alternating rounds)")
    for k, t in med.items():
        print(f"    {k:34s}: {t:6.1f} s  {n / t:7.0f} descriptors/s  {t / base:4.2f}x the bare network's time")


def main() -> None:
    import medssl

    medssl.tune_malloc()  # as the CLI and the notebooks' kernels (Makefile) do
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="volume edge in voxels")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the dense benchmark")
    p.add_argument("--only", choices=["knn", "dense"], default=None)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; timings on a shared machine vary by 10-30 % or more\n")
    if args.only in (None, "knn"):
        bench_knn(args.size)
    if args.only in (None, "dense"):
        bench_dense(args.size, args.rounds)


if __name__ == "__main__":
    main()
