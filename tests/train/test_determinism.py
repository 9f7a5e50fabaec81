"""A seeded run repeats bit for bit, whatever the thread timing (issue 22).

Every registered method trains a few steps at the demo preset's precision (bf16 autocast, which
``precision="auto"`` picks on CPUs with AVX512-BF16/AMX; forced here so that every CPU runs that
path) and its threading (the demo draws batches inline; ``prefetch`` draws them in a helper thread,
as on a GPU machine), on tiny volumes:

1. inline, undisturbed: the reference;
2. with prefetch, random sleeps injected into the prefetch worker and into the method's sampler,
   and into the training thread's forward: identical weights and ``metrics.jsonl`` lines;
3. stopped mid-run (a callback) and resumed from that checkpoint: identical again;
4. SIGKILLed in a subprocess while writing a checkpoint, then resumed: identical (Reg2D, whose curriculum
   makes each batch depend on the step, and SimCLR, whose views draw from the sampling rng).

``metrics.jsonl`` lines are compared without the wall-clock fields ``time_s`` (elapsed seconds),
``samples_per_s`` (patches per second of step time) and ``sample_share`` (share of step time spent
waiting for the batch): they measure the machine, not the run.

Cube methods use the demo's SmallCNN on 16^3 patches, where its fifth block sees 2^3 maps: the
oneDNN bf16 fault of :mod:`medssl.train.determinism` (wrong, call-to-call different weight
gradients) is exercised by every run here. The context methods use their demo networks (D2D-CNN,
D3D-CNN) and a curriculum as long as the run, so a batch drawn at the wrong moment is drawn from
another offset range and the weights differ.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.data.volume import Volume
from medssl.methods import create_method, get_method_class, list_methods
from medssl.presets import build_run
from medssl.train import TrainConfig, fit, load_checkpoint
from medssl.train import loop as loop_module
from medssl.train.determinism import Bf16Conv3dGuard, conv3d_needs_fp32, deterministic_algorithms
from tests.helpers import oblique_affine

REPO = Path(__file__).resolve().parents[2]
METHODS = list_methods()
WALL_CLOCK_FIELDS = ("time_s", "samples_per_s", "sample_share")
CONTEXT = {"reg2d", "heatmap", "doersch", "xavier", "gvdiff"}
STEPS_PER_EPOCH, EPOCHS = 2, 2


def _volumes(n: int = 4) -> list[Volume]:
    """Tiny volumes with a body (an elliptic cylinder of structure on a -1 background), oblique anisotropic grids."""
    rng = np.random.default_rng(7)
    out = []
    for k in range(n):
        shape = (44 + k, 42, 30)
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float64)
        body = ((ijk[0] - shape[0] / 2) / (shape[0] / 2.2)) ** 2 + ((ijk[1] - shape[1] / 2) / (shape[1] / 2.2)) ** 2 < 1
        tissue = np.sin(ijk[0] / 3.0) + np.cos(ijk[1] / 4.0) * ijk[2] / 18.0 + 0.1 * rng.normal(size=shape)
        data = np.where(body, tissue, -1.0)[None].astype(np.float32)
        affine = oblique_affine((1.4, 1.1, 2.5), (20.0, 10.0, -15.0), (8.0 * k, -5.0, 3.0))
        out.append(Volume(data=data, affine=affine, case_id=f"case{k}"))
    return out


VOLUMES = _volumes()


def _build(name: str, prefetch: bool):
    """The demo preset for ``name``, shrunk: bf16, 2 epochs x 2 steps, every step logged, small batches."""
    if name in CONTEXT:  # one anchor (3 planar pairs) per step; the curriculum spans the run, as in the demo preset
        small = {"volumes_per_batch": 1, "curriculum_steps": STEPS_PER_EPOCH * EPOCHS}
    else:
        small = {"volumes_per_batch": 2, "patch_size_vox": 16, "patches_per_volume": 4}
    known = {f.name for f in fields(get_method_class(name).Config)}
    train = {"epochs": EPOCHS, "steps_per_epoch": STEPS_PER_EPOCH, "precision": "bf16", "device": "cpu",
             "log_every": 1, "eval_every_epochs": 1, "checkpoint_every_epochs": 1, "keep_last": None,
             "val_batches": 1, "prefetch": prefetch}
    method, config = build_run(name, "demo", seed=3, method_overrides={k: v for k, v in small.items() if k in known},
                               train_overrides=train)
    return method, config


def _train(name: str, run_dir: Path, *, prefetch: bool = False, stop_at: int | None = None):
    method, config = _build(name, prefetch)
    callbacks = [lambda rec: rec.get("split") == "train" and rec["step"] == stop_at] if stop_at else None
    result = fit(method, VOLUMES, config, run_dir, val_volumes=VOLUMES[:2], progress=False, callbacks=callbacks)
    return method, result


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _metrics_lines(run_dir: Path) -> list[str]:
    """Each record of metrics.jsonl without its wall-clock fields, as canonical JSON (NaN compares equal)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = {k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_FIELDS}
        out.append(json.dumps(rec, sort_keys=True))
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ: {differ[:5]}"
    la, lb = _metrics_lines(a), _metrics_lines(b)
    assert len(la) == len(lb) and la, (len(la), len(lb))
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x == y, f"metrics.jsonl line {i + 1} differs:\n{x}\n{y}"


@pytest.fixture
def delays(monkeypatch):
    """Random sleeps (from a private generator: no global rng is touched) in the prefetch worker, in the
    method's sampler and in the training thread's forward, so draws finish early, late and in between."""
    jitter = random.Random(12345)
    lock = threading.Lock()

    def nap(scale: float = 0.02) -> None:
        with lock:
            t = jitter.random() * scale
        time.sleep(t)

    seen_threads: set[str] = set()
    real_draw = loop_module._BatchSource._draw

    def slow_draw(self):
        seen_threads.add(threading.current_thread().name)
        nap()
        out = real_draw(self)
        nap()
        return out

    monkeypatch.setattr(loop_module._BatchSource, "_draw", slow_draw)
    real_step = loop_module._Trainer.optimizer_step

    def slow_step(self, batch, sample_s):
        nap()
        return real_step(self, batch, sample_s)

    monkeypatch.setattr(loop_module._Trainer, "optimizer_step", slow_step)
    return nap, seen_threads


def _slow_sampler(method, nap) -> None:
    real = method.sample

    def sample(volumes, rng):
        nap()
        return real(volumes, rng)

    method.sample = sample


@pytest.mark.parametrize("name", METHODS)
def test_a_seeded_run_repeats_bit_for_bit_with_thread_delays_and_across_a_stop_and_resume(tmp_path, name, delays):
    nap, seen_threads = delays
    # 1. inline (the demo preset's threading), undisturbed apart from the training thread's naps
    _train(name, tmp_path / "reference")
    ref = _weights(tmp_path / "reference")

    # 2. prefetch thread with random delays, plus a slow sampler
    method, config = _build(name, prefetch=True)
    _slow_sampler(method, nap)
    fit(method, VOLUMES, config, tmp_path / "delayed", val_volumes=VOLUMES[:2], progress=False)
    if method.trains:
        assert any(t.startswith("medssl-prefetch") for t in seen_threads), seen_threads  # the thread really drew
    _assert_same_run(tmp_path / "reference", tmp_path / "delayed")

    # 3. stop mid-epoch (at step 3 of 4), resume from that checkpoint, with prefetch and delays
    if method.trains:
        first, res = _train(name, tmp_path / "resumed", prefetch=True, stop_at=3)
        assert res.step == 3 and res.stopped_early
        assert not all(torch.equal(ref[k], v) for k, v in _weights(tmp_path / "resumed").items())
        _, res = _train(name, tmp_path / "resumed", prefetch=True)
        assert res.step == STEPS_PER_EPOCH * EPOCHS
    else:
        _train(name, tmp_path / "resumed", prefetch=True)
    _assert_same_run(tmp_path / "reference", tmp_path / "resumed")


def _run_and_maybe_die(run_dir: str, name: str, kill_at: int) -> None:
    """Subprocess entry: train ``name`` with prefetch; with ``kill_at`` > 0 SIGKILL mid-write of the k-th last.pt."""
    from tests.train._tiny_run import _die_while_writing_last_pt

    if kill_at:
        _die_while_writing_last_pt(kill_at)
    _train(name, Path(run_dir), prefetch=True)


@pytest.mark.parametrize("name", ["reg2d", "simclr"])
def test_a_run_killed_while_checkpointing_resumes_to_the_uninterrupted_weights_and_metrics(tmp_path, name):
    _train(name, tmp_path / "reference")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, __file__, str(tmp_path / "killed"), name, "2"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == STEPS_PER_EPOCH  # epoch 1's
    _train(name, tmp_path / "killed", prefetch=True)  # resumed in this process
    _assert_same_run(tmp_path / "reference", tmp_path / "killed")


def test_samplers_draw_only_from_the_rng_they_are_given():
    """A batch drawn in the prefetch thread must not touch generators the training thread uses."""
    for name in METHODS:
        method, _ = _build(name, prefetch=False)
        torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        batches = [method.sample(VOLUMES, np.random.default_rng(5)) for _ in range(2)]
        assert torch.equal(torch.get_rng_state(), torch_state), f"{name}: sample() used torch's global generator"
        np_after = np.random.get_state()
        assert np_after[0] == np_state[0] and np.array_equal(np_after[1], np_state[1]) and np_after[2:] == np_state[2:], \
            f"{name}: sample() used numpy's global generator"
        assert random.getstate() == py_state, f"{name}: sample() used python's random module"
        # and the given rng alone decides the batch
        assert torch.equal(batches[0].patches, batches[1].patches), name


# ----------------------------------------------------------------------------- the oneDNN bf16 guard


def _bf16_weight_grad(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().mean().backward()
    return conv.weight.grad.clone()


def test_thin_conv3d_weight_gradients_under_bf16_are_repeatable_and_close_to_fp32_with_the_guard():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 2, 6, 6)  # depth 2 <= 2 * padding: the case oneDNN's bf16 kernel gets wrong
    assert conv3d_needs_fp32(conv, x) and not conv3d_needs_fp32(conv, torch.randn(4, 16, 3, 6, 6))
    conv.zero_grad()
    conv(x).square().mean().backward()
    fp32 = conv.weight.grad.clone()
    guard = Bf16Conv3dGuard(conv)
    try:
        grads = [_bf16_weight_grad(conv, x) for _ in range(4)]
    finally:
        guard.remove()
    assert guard.n_guarded_calls == 4
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    assert float((grads[0] - fp32).norm() / fp32.norm()) < 1e-5  # it ran in float32
    # a thicker input keeps bf16 (error of bf16 rounding, not zero) and the hooks are gone after remove()
    assert not conv._forward_pre_hooks and not conv._forward_hooks
    guard = Bf16Conv3dGuard(conv)
    try:
        thick = torch.randn(4, 16, 4, 6, 6)
        _bf16_weight_grad(conv, thick)
        assert guard.n_guarded_calls == 0
    finally:
        guard.remove()


def test_fit_removes_the_guard_and_leaves_the_global_determinism_settings_as_they_were(tmp_path):
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=2)
    config = TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="bf16")
    before = torch.are_deterministic_algorithms_enabled()
    fit(method, VOLUMES, config, tmp_path, progress=False)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert not any(m._forward_pre_hooks for m in method.modules())


def test_deterministic_algorithms_asks_cuda_for_deterministic_kernels_and_restores_the_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_algorithms(torch.device("cpu")):  # CPU: nothing to change
        assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_algorithms(torch.device("cuda")):  # the settings only; no kernel runs
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    with deterministic_algorithms(torch.device("cuda"), enabled=False):
        assert not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- dense embeddings


def test_dense_embeddings_do_not_depend_on_the_timing_of_their_prefetch_thread(monkeypatch):
    from medssl.evaluate import dense

    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=2)
    vol = VOLUMES[0]
    want = dense.dense_embeddings(method, vol, stride_vox=5, batch_size=7, progress=False, precision="bf16")
    jitter = random.Random(3)
    real = dense._CubeGather.__call__

    def slow(self, batch, out):
        time.sleep(jitter.random() * 0.01)
        return real(self, batch, out)

    monkeypatch.setattr(dense._CubeGather, "__call__", slow)
    got = dense.dense_embeddings(method, vol, stride_vox=5, batch_size=7, progress=False, precision="bf16")
    assert np.array_equal(want.embeddings, got.embeddings, equal_nan=True)
    assert np.isfinite(want.embeddings).all()


if __name__ == "__main__":
    _run_and_maybe_die(sys.argv[1], sys.argv[2], int(sys.argv[3]))
