"""CUDA: device and precision choice, fp16 with its gradient scaler, bf16, the CUDA RNG on resume, NCCL.

Every test here is marked ``cuda`` and skips cleanly where no CUDA GPU is visible (this project's CI and
2-core development machine). ``python benchmarks/gpu.py`` runs them on a GPU machine (``pytest -m cuda``).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from medssl.data.volume import Volume
from medssl.methods import create_method
from medssl.train import TrainConfig, fit, load_checkpoint
from medssl.train.precision import autocast, resolve_device, resolve_precision

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.py runs these)"),
]

TINY = dict(backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=3, embed_dim=8)


def _volumes(n: int = 4, seed: int = 0) -> list[Volume]:
    rng = np.random.default_rng(seed)
    affine = np.array([[0.0, -1.5, 0.3, 10.0], [1.2, 0.0, 0.0, -4.0], [0.0, 0.2, 2.5, 2.0], [0, 0, 0, 1]])
    return [Volume(rng.normal(size=(1, 22, 20, 21)).astype(np.float32), affine, f"c{i}",
                   aux={"body": np.ones((22, 20, 21), np.uint8)}) for i in range(n)]


def _method(seed: int = 0):
    torch.manual_seed(seed)
    return create_method("isimed", **TINY)


def _cfg(**kw) -> TrainConfig:
    # "auto": cuda:LOCAL_RANK (cuda:0 here), the device a torchrun rank would train on
    base = dict(epochs=2, steps_per_epoch=3, lr=3e-3, seed=3, device="auto", log_every=1, keep_last=None)
    return TrainConfig(**(base | kw))


def test_auto_device_is_this_ranks_gpu_and_auto_precision_is_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    assert resolve_device("auto") == torch.device("cuda", torch.cuda.device_count() - 1)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    x = torch.randn(8, 8, device="cuda")
    pairs = [("fp16", torch.float16), ("fp32", torch.float32)]
    pairs += [("bf16", torch.bfloat16)] if torch.cuda.is_bf16_supported() else []
    for precision, dtype in pairs:
        with autocast(torch.device("cuda", 0), precision):
            assert (x @ x).dtype == dtype


def test_fit_on_cuda_puts_the_method_on_the_gpu_and_checkpoints_load_on_the_cpu(tmp_path):
    method = _method()
    result = fit(method, _volumes(), _cfg(precision="fp32"), tmp_path / "run", progress=False)
    assert result.step == 6
    assert next(method.parameters()).device.type == "cuda"
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_fp16_training_uses_a_gradient_scaler_and_checkpoints_its_state(tmp_path):
    method = _method()
    fit(method, _volumes(), _cfg(precision="fp16"), tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu")
    scaler = state["scaler"]
    assert scaler and float(scaler["scale"]) > 0  # an enabled GradScaler's state, saved for resume
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_fp16_resume_restores_the_gradient_scaler(tmp_path):
    cfg = _cfg(precision="fp16")
    fit(_method(), _volumes(), cfg, tmp_path / "run", progress=False,
        callbacks=[lambda r: r["split"] == "train" and r["step"] == 2])
    scale_at_stop = float(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]["scale"])
    from medssl.train import loop

    seen = {}
    real = loop._Trainer.restore

    def spy(self, resume):
        real(self, resume)
        seen["scale"] = float(self.scaler.get_scale())

    loop._Trainer.restore = spy
    try:
        fit(_method(seed=9), _volumes(), cfg, tmp_path / "run", progress=False)
    finally:
        loop._Trainer.restore = real
    assert seen["scale"] == scale_at_stop


@pytest.mark.parametrize("name", ["isimed", "simclr", "reg2d"])
def test_bf16_training_runs_under_autocast_and_stays_finite(tmp_path, name):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    from medssl.presets import build_run

    torch.manual_seed(0)
    method, cfg = build_run(name, "tiny", train_overrides={"device": "auto", "precision": "bf16"})
    seen = []
    real = method.training_step

    def step(batch):
        seen.append(torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
        return real(batch)

    method.training_step = step
    fit(method, _volumes(), cfg, tmp_path / "run", progress=False)
    assert seen and all(seen)
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_resume_restores_the_cuda_rng_so_the_run_equals_an_uninterrupted_one(tmp_path):
    """Dropout on the GPU draws from the CUDA generator: resume is exact only if its state comes back."""
    cfg = _cfg(precision="fp32", deterministic=True)

    def method(seed):
        m = _method(seed)
        m.backbone.fc = torch.nn.Sequential(torch.nn.Dropout(0.3), m.backbone.fc)  # draws from the CUDA RNG
        return m

    full = method(0)
    fit(full, _volumes(), cfg, tmp_path / "full", progress=False)
    first = method(0)
    fit(first, _volumes(), cfg, tmp_path / "split", progress=False,
        callbacks=[lambda r: r["split"] == "train" and r["step"] == 4])
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["cuda_rng"] is not None
    resumed = method(7)  # other weights, and fit reseeds the generators: only the checkpoint can restore them
    fit(resumed, _volumes(), cfg, tmp_path / "split", progress=False)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs after resume")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_one_rank_nccl_group_reduces_on_the_gpu_and_fit_runs_inside_it(tmp_path, monkeypatch):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        x = torch.arange(4.0, device="cuda")
        dist.all_reduce(x)
        assert torch.equal(x.cpu(), torch.arange(4.0))
        assert dist.get_backend() == "nccl"
        result = fit(_method(), _volumes(), _cfg(precision="fp32"), tmp_path / "run", progress=False)
        assert result.step == 6
    finally:
        dist.destroy_process_group()
