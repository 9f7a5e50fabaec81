"""The GPU paths on a CPU machine: device and precision choice, fp16 with its scaler, the CUDA RNG in
checkpoints, NCCL device ids. ``torch.cuda`` is replaced by :class:`FakeCuda` (a two-GPU machine with a
generator state per device) where the code asks CUDA something; fp16 runs for real on the CPU (CPU
autocast and ``GradScaler("cpu")``). The CUDA-marked tests of the speed issue run the same on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import medssl.train.ddp as ddp
import medssl.train.loop as loop
from medssl.methods import base as method_base
from medssl.methods.base import register_method
from medssl.train import fit, load_checkpoint
from medssl.train.precision import autocast, resolve_device, resolve_precision
from tests.train.test_loop import _CFG, _TEST_NAME, _new_method, _TinyRegressor, _volumes


class FakeCuda:
    """What ``torch.cuda`` answers on a machine with ``n`` GPUs: a current device and a generator per device."""

    NAMES = ("is_available", "device_count", "is_initialized", "current_device", "set_device", "get_rng_state",
             "set_rng_state", "is_bf16_supported")  # fmt: skip

    def __init__(self, n: int = 2, bf16: bool = True) -> None:
        self.n, self.bf16, self.current = n, bf16, 0
        self.rng = {i: torch.full((8,), 10 * (i + 1), dtype=torch.uint8) for i in range(n)}

    def install(self, monkeypatch) -> FakeCuda:
        for name in self.NAMES:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    def _index(self, device) -> int:
        d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        assert d.type == "cuda", f"a CUDA call got device {d}"
        return self.current if d.index is None else d.index

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.n

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return self.current

    def set_device(self, device) -> None:
        self.current = self._index(device)

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.rng[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.rng[self._index(device)] = state.clone()

    def is_bf16_supported(self, *args, **kwargs) -> bool:
        return self.bf16


@pytest.fixture
def registered():
    register_method(_TEST_NAME)(_TinyRegressor)
    yield _TinyRegressor
    method_base._REGISTRY.pop(_TEST_NAME, None)


# ---------------------------------------------------------------------------- device and precision choice


@pytest.mark.parametrize(("local_rank", "index"), [(None, 0), ("1", 1)])
def test_auto_and_bare_cuda_mean_this_ranks_gpu_and_auto_falls_back_to_the_cpu(monkeypatch, local_rank, index):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    FakeCuda().install(monkeypatch)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", index)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("bf16", "want"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch, bf16, want):
    FakeCuda(bf16=bf16).install(monkeypatch)
    assert resolve_precision("auto", torch.device("cuda", 1)) == want
    assert resolve_precision("fp32", torch.device("cuda", 1)) == "fp32"  # an explicit choice is kept


@pytest.mark.parametrize(("capability", "native", "want"), [
    ("AVX512", True, "bf16"), ("AMX", True, "bf16"), ("AVX512", False, "fp32"), ("AVX2", True, "fp32"),
])  # fmt: skip
def test_auto_precision_on_a_cpu_is_bf16_only_with_native_bf16_instructions(monkeypatch, capability, native, want):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == want
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_autocast_runs_matmuls_in_the_chosen_half_precision(precision, dtype):
    layer = torch.nn.Linear(4, 3)
    with autocast(torch.device("cpu"), precision):
        assert layer(torch.randn(2, 4)).dtype == dtype
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


# ---------------------------------------------------------------------------- fp16 and its gradient scaler


def test_fp16_training_uses_a_gradient_scaler_that_skips_a_non_finite_step_and_resumes_with_its_scale(
    tmp_path, registered
):
    """A NaN gradient (finite loss) on the 2nd step: GradScaler skips that update and halves its scale (as it
    does for an fp16 overflow; no growth before 2000 steps), training goes on; the scaler state is
    checkpointed, and a run stopped at step 6 and resumed ends where an uninterrupted one does, with the
    same scale. A scaler left out of the checkpoint would resume at the initial 65536."""
    cfg = replace(_CFG, precision="fp16")
    train, val = _volumes(5), _volumes(2, seed=1)
    full = _new_method(nan_grad_at_calls=(1,))
    fit(full, train, cfg, tmp_path / "full", val_volumes=val, progress=False)
    want = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    init_scale = torch.amp.GradScaler("cpu").get_scale()
    clean = _new_method()
    fit(clean, train, cfg, tmp_path / "clean", val_volumes=val, progress=False)
    clean_scale = load_checkpoint(tmp_path / "clean" / "checkpoints" / "last.pt")["scaler"]["scale"]
    assert want["step"] == 12 and want["scaler"]["scale"] < init_scale  # backed off (also fp16 overflows do)
    assert want["scaler"]["scale"] < clean_scale  # and once more than without the NaN step
    assert all(c[3] for c in full.calls if c[0] == "step" and c[1])  # every training step ran under autocast

    first = _new_method(nan_grad_at_calls=(1,))
    fit(first, train, cfg, tmp_path / "split", val_volumes=val, progress=False,
        callbacks=[lambda r: r["split"] == "train" and r["step"] == 6])  # fmt: skip
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["scaler"]["scale"] < init_scale
    second = _new_method(init_seed=123, nan_grad_at_calls=(1,))
    second.n_train_calls = 6  # the NaN step lies behind: a lower scale can only come from the checkpoint
    fit(second, train, cfg, tmp_path / "split", val_volumes=val, progress=False)
    got = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert got["scaler"] == want["scaler"]
    for (name, p_full), p_resumed in zip(full.named_parameters(), second.parameters()):
        torch.testing.assert_close(p_resumed, p_full, rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs")


def test_fp32_and_bf16_checkpoints_carry_no_scaler_state(tmp_path, registered):
    for precision in ("fp32", "bf16"):
        result = fit(_new_method(), _volumes(3), replace(_CFG, precision=precision, epochs=1), tmp_path / precision,
                     progress=False)  # fmt: skip
        assert load_checkpoint(result.checkpoint_path)["scaler"] == {}


# ---------------------------------------------------------------------------- the CUDA RNG in checkpoints


def _started_trainer(method, run_dir):
    t = loop._Trainer(method, _volumes(3), replace(_CFG, epochs=1), run_dir, None, [], False)
    t.record_preprocessing(None)
    t.tensorboard = False
    t.restore(True)
    t.start()
    return t


def test_a_checkpoint_keeps_the_cuda_generator_of_the_training_gpu_and_resume_restores_that_gpus(
    tmp_path, registered, monkeypatch
):
    """The trainer of rank 1 trains on cuda:1 while cuda:0 is the current device (as before set_device):
    the checkpoint must hold cuda:1's generator, and resuming must restore cuda:1's, not cuda:0's."""
    t = _started_trainer(_new_method(), tmp_path)  # built on the CPU; from here on it trains "on cuda:1"
    cuda = FakeCuda().install(monkeypatch)
    t.device = torch.device("cuda", 1)
    t.save(epoch_file=False)
    t.close()
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["cuda_rng"]
    assert torch.equal(saved, cuda.rng[1]) and not torch.equal(saved, cuda.rng[0])

    cuda.rng = {0: torch.zeros(8, dtype=torch.uint8), 1: torch.ones(8, dtype=torch.uint8)}  # both moved on
    real_load = loop.load_checkpoint
    monkeypatch.setattr(loop, "load_checkpoint", lambda path, map_location: real_load(path, "cpu"))  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the new trainer is built on the CPU
    resumed = loop._Trainer(_new_method(), _volumes(3), replace(_CFG, epochs=1), tmp_path, None, [], False)
    resumed.record_preprocessing(None)
    cuda.install(monkeypatch)
    resumed.device = torch.device("cuda", 1)
    resumed.restore(True)
    assert torch.equal(cuda.rng[1], saved) and torch.equal(cuda.rng[0], torch.zeros(8, dtype=torch.uint8))


def test_a_cpu_run_stores_no_cuda_generator_even_where_cuda_is_initialised(tmp_path, registered, monkeypatch):
    t = _started_trainer(_new_method(), tmp_path)
    FakeCuda().install(monkeypatch)
    t.save(epoch_file=False)
    t.close()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["cuda_rng"] is None


# ---------------------------------------------------------------------------- NCCL and DDP device ids


@pytest.mark.parametrize(("device", "backend", "current"), [("auto", "nccl", 1), ("cuda", "nccl", 1), ("cpu", "gloo", 0)])
def test_medssl_train_under_torchrun_puts_each_rank_on_its_gpu_before_nccl_starts(monkeypatch, device, backend, current):
    import torch.distributed as dist

    from medssl.cli import main

    cuda = FakeCuda().install(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = []

    def init_process_group(backend_name, *args, **kwargs):
        seen.append((backend_name, cuda.current))
        raise RuntimeError("stopped after init_process_group")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    assert main(["train", "--method", "isimed", "--run", "nccl", "-t", "device", device]) == 1
    assert seen == [(backend, current)]  # rank 1's GPU is the current device when NCCL starts; CPU runs use gloo


@pytest.mark.parametrize(("device", "ids"), [(torch.device("cuda", 1), [1]), (torch.device("cpu"), None)])
def test_ddp_wraps_the_training_step_with_this_ranks_gpu_as_its_only_device(monkeypatch, registered, device, ids):
    made = {}
    monkeypatch.setattr(ddp, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, device_ids=None, **kw: made.update(module=module, ids=device_ids, **kw) or module)
    wrapped = ddp.wrap_for_training(_new_method(), device)
    assert made["ids"] == ids and made["find_unused_parameters"] is True
    assert isinstance(wrapped, ddp.TrainingStepModule)
