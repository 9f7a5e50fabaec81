"""Evaluation rows side by side (medssl.evaluate.rows): order, one thread per worker, and the same numbers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from medssl.evaluate import knn_seg
from medssl.evaluate.correspondence import evaluate_correspondence
from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.rows import map_rows, resolve_workers
from medssl.evaluate.runs import random_init_like
from medssl.methods import list_methods
from medssl.presets import build_run
from tests.evaluate.test_correspondence import PERFECT, RANDOM, A, B, true_map
from tests.evaluate.test_knn_seg import ORGANS, labelled_volume


@pytest.fixture
def two_torch_threads():
    """The caller's torch budget is two threads (the 2-core machine), whatever the test environment set."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_rows_come_back_in_order_computed_side_by_side_on_one_thread_each(two_torch_threads):
    seen = {}

    def row(i):
        t0 = time.perf_counter()
        time.sleep(0.3)
        seen[i] = (torch.get_num_threads(), threading.current_thread().name, t0, time.perf_counter())
        return i * i

    assert map_rows(row, range(4), workers=2) == [0, 1, 4, 9]
    assert {v[0] for v in seen.values()} == {1}  # one torch thread in every worker
    assert all(v[1].startswith("medssl-row") for v in seen.values())
    (s0, e0), (s1, e1) = [(seen[i][2], seen[i][3]) for i in (0, 1)]
    assert s1 < e0 and s0 < e1, "the first two rows did not overlap"
    assert torch.get_num_threads() == 2  # the caller's setting is back
    # one worker: the plain loop, on the caller's thread and threads
    seen.clear()
    assert map_rows(row, range(3), workers=1) == [0, 1, 4]
    assert {v[0] for v in seen.values()} == {2} and {v[1] for v in seen.values()} == {threading.current_thread().name}


def test_a_failing_row_raises_and_the_callers_threads_are_restored(two_torch_threads):
    def row(i):
        if i == 1:
            raise ValueError("row 1 is broken")
        return i

    with pytest.raises(ValueError, match="row 1 is broken"):
        map_rows(row, range(3), workers=2)
    assert torch.get_num_threads() == 2


def test_auto_workers_follow_the_callers_torch_threads_and_stay_at_one_on_a_gpu(two_torch_threads):
    model = torch.nn.Linear(2, 2)
    assert resolve_workers("auto", 13, [model]) == 2
    assert resolve_workers("auto", 1, [model]) == 1
    torch.set_num_threads(1)  # e.g. OMP_NUM_THREADS=1 (the test suite's workers)
    assert resolve_workers("auto", 13, [model]) == 1
    torch.set_num_threads(2)
    assert resolve_workers("auto", 13, [torch.nn.Linear(2, 2, device="meta")]) == 1  # not on the CPU
    assert resolve_workers(4, 3) == 3
    for bad in (0, -2, "many", 2.0, True):
        with pytest.raises(ValueError, match="workers must be"):
            resolve_workers(bad, 3)


def _demo_networks() -> dict[str, torch.nn.Module]:
    """Every demo method's network at its demo preset, and the untrained twins the tables use."""
    nets = {}
    for name in list_methods(demo=True):
        torch.manual_seed(0)
        nets[name] = build_run(name, "demo")[0].eval()
    nets["random-init[smallcnn]"] = random_init_like(nets["isimed"], seed=0)
    return nets


def test_dense_descriptors_of_every_demo_network_are_bit_identical_on_one_thread_and_on_two(two_torch_threads):
    """The claim behind computing rows side by side: a forward pass's bits do not depend on the thread count."""
    vol = labelled_volume("q", 3)
    pad = ((20, 20), (20, 20), (24, 24))  # 62 x 59 x 65 voxels: room for the 2.5D inputs
    vol = vol.with_(data=np.pad(vol.data, ((0, 0), *pad), mode="reflect"),
                    aux={"body": np.pad(vol.aux["body"], pad, mode="edge")}, label=np.pad(vol.label, pad))
    nets = _demo_networks()
    assert len(nets) >= 10
    two = {n: dense_embeddings(m, vol, stride_vox=9, batch_size=64, progress=False).embeddings for n, m in nets.items()}
    one = dict(zip(nets, map_rows(lambda n: dense_embeddings(nets[n], vol, stride_vox=9, batch_size=64,
                                                              progress=False).embeddings, list(nets), workers=2)))
    differ = [n for n in nets if not np.array_equal(two[n], one[n], equal_nan=True)]
    assert not differ, f"dense descriptors differ between one and two threads: {differ}"


def test_knn_and_correspondence_tables_are_identical_with_rows_side_by_side(two_torch_threads):
    atlases = [labelled_volume(f"a{i}", i) for i in range(3)]
    queries = [labelled_volume(f"q{i}", 10 + i) for i in range(2)]
    rows = {"raw": knn_seg.RawIntensityDescriptor(3, 1), "raw5": knn_seg.RawIntensityDescriptor(5, 1)}
    kw = dict(n_atlases=[1, 3], n_draws=2, k=3, stride_vox=3, surface_tolerance_mm=2.0, progress=False)
    one = knn_seg.evaluate_knn_segmentation(rows, atlases, queries, ORGANS, workers=1, **kw)
    two = knn_seg.evaluate_knn_segmentation(rows, atlases, queries, ORGANS, workers=2, **kw)
    assert list(two.seconds) == list(one.seconds) == ["raw", "raw5", "identity"]
    assert two.scores.equals(one.scores) and len(one.scores)
    kw = dict(n_points=80, seed=0, stride_vox=2, progress=False)
    vols, pairs = [A.volume, B.volume], [("a", "b"), ("b", "a")]
    c1 = evaluate_correspondence({"perfect": PERFECT, "random": RANDOM}, vols, pairs, true_map, workers=1, **kw)
    c2 = evaluate_correspondence({"perfect": PERFECT, "random": RANDOM}, vols, pairs, true_map, workers=2, **kw)
    assert c2.points.equals(c1.points) and c2.summary.equals(c1.summary)


def test_itks_single_thread_setting_holds_until_the_last_of_two_concurrent_registrations_ends():
    """Two registration rows side by side: the first to finish must not give the other a threaded metric."""
    import SimpleITK as sitk

    from medssl.evaluate.registration import _itk_one_thread

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
    try:
        a_done, inside = threading.Event(), []

        def first():
            with _itk_one_thread():
                time.sleep(0.2)
            a_done.set()

        def second():
            with _itk_one_thread():
                a_done.wait(5)
                inside.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert inside == [1]  # still one thread after the first registration ended
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3  # restored after the last
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
