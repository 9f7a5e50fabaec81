"""Fine-tuning: the encoder really starts from the checkpoint, a frozen encoder stays bit-identical, one network per backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.data.volume import Volume
from medssl.evaluate import finetune as ft
from medssl.evaluate.segmetrics import OrganSet
from medssl.models import segmentation as seg
from tests.helpers import oblique_affine

# one worker builds its module-scoped fixtures once: `make test` runs pytest-xdist --dist loadgroup, and a module
# split over two workers builds its module-scoped fixtures on each
pytestmark = pytest.mark.xdist_group("finetune")

ORGANS = OrganSet(names=("a", "b"), label_ids=(1, 2))
SHAPE = (24, 22, 20)
TINY = ft.FinetuneConfig(steps=3, batch_size=1, crop_size_vox=16, warmup_steps=1, log_every=1, precision="fp32",
                         device="cpu")


def labelled_volume(case_id: str, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.int16)
    label[4:12, 4:12, 4:12] = 1
    label[14:20, 12:18, 10:16] = 2
    data = rng.normal(size=(1, *SHAPE)).astype(np.float32) + label[None]
    return Volume(data, oblique_affine((1.5, 1.5, 2.0)), case_id, label=label, aux={"body": np.ones(SHAPE, np.uint8)})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A SmallCNN ISImed trained for two steps (its weights differ from any fresh initialisation)."""
    from medssl.methods import create_method
    from medssl.train.config import TrainConfig
    from medssl.train.loop import fit

    run = tmp_path_factory.mktemp("ft") / "isimed"
    torch.manual_seed(0)
    m = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4,
                      foreground_only=True)
    fit(m, [labelled_volume(f"t{i}", i) for i in range(2)],
        TrainConfig(epochs=1, steps_per_epoch=2, device="cpu", precision="fp32", log_every=1, lr=0.05), run,
        progress=False)
    return run / "checkpoints" / "last.pt"


def checkpoint_encoder(path, prefix: str) -> dict[str, torch.Tensor]:
    from medssl.train.checkpoint import load_checkpoint

    model = load_checkpoint(path)["model"]
    key = "backbone." + prefix
    return {k[len(key):]: v for k, v in model.items() if k.startswith(key)}


def encoder_snapshots(method, config, **kw) -> tuple[dict[int, dict[str, torch.Tensor]], ft.FinetuneResult]:
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step, net):
        snaps[step] = {k: v.detach().clone() for k, v in net.encoder.state_dict().items()}

    res = ft.finetune(method, [labelled_volume("t0", 0)], ORGANS, config, step_callback=keep, **kw)
    return snaps, res


def test_the_finetuned_encoder_starts_from_the_checkpoint_weights(checkpoint):
    from medssl.evaluate.runs import random_init_like
    from medssl.train.checkpoint import load_method

    method = load_method(checkpoint)
    snaps, res = encoder_snapshots(method, TINY)
    saved = checkpoint_encoder(checkpoint, res.net.encoder_key_prefix)
    assert set(saved) == set(snaps[0]) and saved
    for k, v in saved.items():
        assert torch.equal(snaps[0][k], v), k  # the load is real: bit-identical at step 0
    fresh = random_init_like(method, seed=0)
    fresh_snaps, _ = encoder_snapshots(fresh, TINY)
    assert any(not torch.equal(fresh_snaps[0][k], v) for k, v in saved.items())  # a fresh init differs
    assert any(not torch.equal(snaps[3][k], v) for k, v in saved.items())  # fine-tuning moved the encoder
    # the method itself is untouched (its backbone was copied)
    for k, v in method.backbone.state_dict().items():
        if k.startswith(res.net.encoder_key_prefix):
            assert torch.equal(v, saved[k[len(res.net.encoder_key_prefix):]])


def test_a_frozen_encoder_stays_bit_identical_while_the_decoder_learns(checkpoint):
    from medssl.train.checkpoint import load_method

    method = load_method(checkpoint)
    config = ft.with_overrides(TINY, freeze_encoder=True)
    decoder_before = {}

    def keep(step, net):
        if step == 0:
            decoder_before.update({k: v.clone() for k, v in net.state_dict().items() if not k.startswith("encoder.")})

    snaps, res = encoder_snapshots(method, config)
    saved = checkpoint_encoder(checkpoint, res.net.encoder_key_prefix)
    for step in (0, 3):
        for k, v in saved.items():
            assert torch.equal(snaps[step][k], v), (step, k)
    ft.finetune(method, [labelled_volume("t0", 0)], ORGANS, config, step_callback=keep)
    after = {k: v for k, v in res.net.state_dict().items() if not k.startswith("encoder.")}
    assert any(not torch.equal(after[k], v) for k, v in decoder_before.items())


def test_runs_with_the_same_seed_and_steps_see_the_same_decoder_init_and_crops(checkpoint, tmp_path):
    from medssl.evaluate.runs import random_init_like
    from medssl.train.checkpoint import load_method
    from medssl.train.metrics import read_metrics

    method = load_method(checkpoint)
    a = ft.finetune(method, [labelled_volume("t0", 0)], ORGANS, TINY, tmp_path / "a",
                    val_volumes=[labelled_volume("v", 7)], test_volumes=[labelled_volume("s", 8)], name="isimed")
    b = ft.finetune(random_init_like(method), [labelled_volume("t0", 0)], ORGANS, TINY, tmp_path / "b")
    dec = [{k: v for k, v in r.net.state_dict().items() if k.startswith("up_blocks.0.conv")} for r in (a, b)]
    assert set(dec[0]) == set(dec[1])
    metrics = read_metrics(tmp_path / "a")
    assert list(metrics.loc[metrics["split"] == "train", "step"]) == [1, 2, 3]
    assert "dice_mean" in metrics.loc[metrics["split"] == "val"].columns
    assert set(a.scores["organ"]) == {"a", "b"} and a.scores["dice"].between(0, 1).all()
    assert {"nsd", "query", "method", "n_subjects"} <= set(a.scores.columns)


def test_densenet121_gets_a_unet_decoder_over_its_five_resolutions():
    from medssl.methods import create_method

    m = create_method("isimed", backbone="densenet121", patch_size_vox=32)
    net = seg.segmentation_net(m, 3, crop_size_vox=32)
    assert isinstance(net, seg.CnnUNet) and net.total_stride == 32
    names = [name for name, _ in net.encoder.named_children()]
    assert [names[i] for i in net.taps] == ["relu0", "denseblock1", "denseblock2", "denseblock3", "norm5"]
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="multiple of the encoder's total stride"):
        seg.segmentation_net(m, 3, crop_size_vox=48)


def test_smallcnn_unet_keeps_the_input_size():
    from medssl.methods import create_method

    net = seg.segmentation_net(create_method("isimed", backbone="smallcnn", patch_size_vox=16), 4, crop_size_vox=32)
    assert net.total_stride == 16 and len(net.taps) == 4
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 1, 32, 32, 32)).shape == (2, 4, 32, 32, 32)


def test_a_swin_backbone_becomes_a_swinunetr_with_the_same_encoder_weights():
    from medssl.methods import create_method

    m = create_method("isimed", backbone="swin", patch_size_vox=32)
    net = seg.segmentation_net(m, 3, crop_size_vox=64)
    assert isinstance(net, seg.SwinSegmenter)
    prefix = net.encoder_key_prefix
    for k, v in m.backbone.state_dict().items():
        if k.startswith(prefix):
            assert torch.equal(net.encoder.state_dict()[k[len(prefix):]], v), k


def test_backbones_without_a_segmentation_network_are_refused_by_name():
    from torch import nn

    class Planar(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(3, 2)

    with pytest.raises(seg.UnsupportedBackboneError, match="no segmentation network for backbone Linear"):
        seg.segmentation_net(Planar(), 3)


def test_finetuning_subjects_are_nested_seeded_training_subjects_and_never_the_held_out_ones(checkpoint):
    from medssl.train.checkpoint import load_method

    pool = [f"t{i}" for i in range(8)]
    assert ft.finetune_subjects(pool, 2, 0) == ft.finetune_subjects(pool, 4, 0)[:2]
    assert ft.finetune_subjects(pool, 4, 0) == ft.finetune_subjects(pool, 4, 0)
    train = [labelled_volume("t0", 0), labelled_volume("t1", 1)]
    with pytest.raises(ValueError, match="overlap"):
        ft.finetune_comparison({"isimed": load_method(checkpoint)}, train, ORGANS, [1], TINY,
                               test_volumes=[train[1]])


def test_the_swin_adapter_builds_a_swinunetr_whose_swinvit_holds_the_backbone_transformer():
    """Independent of the registered backbones: any module holding a MONAI SwinTransformer."""
    from types import SimpleNamespace

    from monai.networks.nets.swin_unetr import SwinTransformer
    from torch import nn

    class TinySwinBackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = SwinTransformer(in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2),
                                           depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), spatial_dims=3)

    torch.manual_seed(3)
    method = SimpleNamespace(backbone=TinySwinBackbone(), config=SimpleNamespace(in_channels=1), name="fake-swin")
    net = seg.segmentation_net(method, 3, crop_size_vox=64)
    assert isinstance(net, seg.SwinSegmenter) and net.encoder_key_prefix == "encoder." and net.total_stride == 32
    for k, v in method.backbone.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v), k
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)
    with pytest.raises(ValueError, match="too small"):
        seg.segmentation_net(method, 3, crop_size_vox=32)


def test_the_demo_finetunes_the_demo_methods_whose_class_asks_for_it(monkeypatch):
    from medssl.methods import list_methods, method_info

    trained = list_methods(trains=True)
    chosen = ft.finetune_methods("demo", trained)
    assert chosen == [m for m in trained if method_info(m)["in_demo"] and method_info(m)["in_finetune_demo"]]
    assert {"isimed", "simsiam"} <= set(chosen) and "regisimed" not in chosen  # same family as isimed, not chosen
    assert "simsiam-iou-0-0" not in chosen  # a variant of a chosen class, but not in the demo
    from medssl.methods.isimed import Isimed

    monkeypatch.setattr(Isimed, "in_finetune_demo", False)  # the class decides, nothing else names it
    assert "isimed" not in ft.finetune_methods("demo", trained)
    assert ft.finetune_methods("all", trained) == trained and ft.finetune_methods(["x"], trained) == ["x"]
    with pytest.raises(ValueError, match="finetune_methods"):
        ft.finetune_methods("some", trained)


def test_finetuning_records_what_fit_records_and_stops_on_a_non_finite_loss(checkpoint, tmp_path, monkeypatch):
    from medssl.train.checkpoint import load_method
    from medssl.train.loop import NonFiniteLossError
    from medssl.train.metrics import read_metrics

    method = load_method(checkpoint)
    res = ft.finetune(method, [labelled_volume("t0", 0)], ORGANS, TINY, tmp_path / "ft", name="isimed")
    pretrain = read_metrics(checkpoint.parent.parent)
    tuned = read_metrics(tmp_path / "ft")
    fit_keys = set(pretrain.loc[pretrain["split"] == "train"].dropna(axis=1, how="all").columns)
    tune_keys = set(tuned.loc[tuned["split"] == "train"].dropna(axis=1, how="all").columns)
    # the training records come from the same StepWindow (fit adds the method's own logs and its skip counter)
    assert {"loss", "grad_norm", "samples_per_s", "sample_share", "lr", "step", "epoch", "time_s"} <= tune_keys
    assert tune_keys - fit_keys == set()
    grads = [q.grad for q in res.net.parameters() if q.grad is not None]
    last = tuned.loc[tuned["split"] == "train"].iloc[-1]
    assert np.isclose(last["grad_norm"], float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
    assert last["samples_per_s"] > 0 and 0 <= last["sample_share"] <= 1

    from monai.losses import DiceCELoss

    monkeypatch.setattr(DiceCELoss, "forward", lambda self, x, y: x.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"isimed: non-finite Dice-CE loss \(nan\) at step 1 of 3"):
        ft.finetune(method, [labelled_volume("t0", 0)], ORGANS, TINY, name="isimed")
