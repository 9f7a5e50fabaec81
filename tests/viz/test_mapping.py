"""``medssl map``: a checkpoint and a scan in, a latent map on the scan's own grid and affine out."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medssl.cli import main
from medssl.data.io import read_volume
from medssl.geometry import vox_to_world
from medssl.viz.mapping import load_frame, map_scan, resample_grid_to_scan, save_frame
from tests.helpers import make_volume_file, oblique_affine, tiny_checkpoints, world_grid_mm, write_dicom_series

SCAN_AFFINE = oblique_affine((1.2, 2.0, 3.5), (20.0, -15.0, 30.0), (-40.0, 25.0, -30.0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: one optimiser step of a tiny ISImed on synthetic volumes."""
    return tiny_checkpoints(tmp_path_factory.mktemp("run"), ["isimed"], patch_size_vox=8)["isimed"]


def test_resampling_a_linear_field_onto_an_oblique_scan_grid_puts_each_value_at_its_world_position():
    # dense grid: every 2nd voxel of a 3 mm RAS grid; values = world (x, y, z) mm of the grid centres
    pre_affine = np.array([[3.0, 0, 0, -60], [0, 3.0, 0, -50], [0, 0, 3.0, -70], [0, 0, 0, 1]])
    pre_shape = (40, 36, 44)
    grid_to_vox = np.diag([2.0, 2.0, 2.0, 1.0])
    grid_to_vox[:3, 3] = 0.5  # half-voxel offset as for even patches
    grid_affine = pre_affine @ grid_to_vox
    g_shape = (20, 18, 22)
    values = world_grid_mm(g_shape, grid_affine).astype(np.float32)  # (Gx, Gy, Gz, 3)
    scan_shape = (30, 20, 14)
    out, inside = resample_grid_to_scan(values, grid_affine, pre_affine, pre_shape, SCAN_AFFINE, scan_shape)
    assert out.shape == (*scan_shape, 3) and inside.shape == scan_shape
    world = world_grid_mm(scan_shape, SCAN_AFFINE)
    lo = vox_to_world(grid_affine, [0, 0, 0])[0]
    hi = vox_to_world(grid_affine, np.asarray(g_shape) - 1.0)[0]
    interior = np.all((world > lo + 1) & (world < hi - 1), axis=-1)
    assert interior.sum() > 500
    np.testing.assert_allclose(out[interior], world[interior], atol=1e-3)  # trilinear is exact on a linear field
    pre_vox = (world - pre_affine[:3, 3]) / 3.0
    outside = np.any((pre_vox < -0.5) | (pre_vox > np.asarray(pre_shape) - 0.5), axis=-1)
    assert outside.any() and not inside[outside].any() and np.all(out[outside] == 0)
    assert inside[~outside].all()


def test_medssl_map_on_an_oblique_nifti_writes_a_map_whose_affine_equals_the_scans(tmp_path, checkpoint, capsys):
    scan = make_volume_file(tmp_path, shape=(36, 24, 14), affine=SCAN_AFFINE, label=False, name="oblique_ct")
    out = tmp_path / "maps" / "oblique_map.nii.gz"
    assert main(["map", str(checkpoint), str(scan.image_path), "-o", str(out), "--stride-vox", "2", "--quiet"]) == 0
    scan_img, map_img = nib.load(scan.image_path), nib.load(out)
    np.testing.assert_array_equal(map_img.affine, scan_img.affine)
    assert map_img.shape == scan_img.shape and map_img.header["datatype"] == 128  # RGB24 on the scan grid
    assert int(map_img.header["sform_code"]) == 1 and int(map_img.header["qform_code"]) == 1
    rgb = np.asanyarray(map_img.dataobj)
    body = scan.data > 50
    coloured = (rgb["R"].astype(int) + rgb["G"] + rgb["B"]) > 0
    assert coloured[body].mean() > 0.95  # the body has colours...
    assert len(np.unique(np.stack([rgb["R"][body], rgb["G"][body], rgb["B"][body]], 1), axis=0)) > 20  # ...that vary
    png = out.with_name("oblique_map.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert str(out) in text and "oblique_map.frame.npz" in text


def test_map_scan_reuses_a_saved_frame_for_identical_colours_and_reads_nrrd_in_ras(tmp_path, checkpoint):
    nifti = make_volume_file(tmp_path / "a", shape=(30, 22, 12), affine=SCAN_AFFINE, label=False, name="scan")
    first = map_scan(checkpoint, nifti.image_path, tmp_path / "first.nii.gz", png_path=None, stride_vox=3,
                     progress=False)  # fmt: skip
    assert first.png_path is None and first.frame_path.name == "first.frame.npz"
    again = map_scan(checkpoint, nifti.image_path, tmp_path / "again.nii.gz", png_path=None, stride_vox=3,
                     frame=first.frame_path, progress=False)  # fmt: skip
    np.testing.assert_array_equal(np.asanyarray(nib.load(again.map_path).dataobj),
                                  np.asanyarray(nib.load(first.map_path).dataobj))  # fmt: skip
    frame = load_frame(first.frame_path)
    np.testing.assert_allclose(frame.components, load_frame(save_frame(tmp_path / "f.npz", frame)).components)

    nrrd = make_volume_file(tmp_path / "b", shape=(30, 22, 12), affine=SCAN_AFFINE, label=False, name="scan",
                            suffix=".nrrd")  # fmt: skip
    res = map_scan(checkpoint, nrrd.image_path, tmp_path / "nrrd_map.nii.gz", png_path=tmp_path / "p.png",
                   stride_vox=3, frame=frame, progress=False)  # fmt: skip
    # NRRD stores LPS; the map is a NIfTI in RAS on the same voxel grid, so it overlays the scan
    np.testing.assert_allclose(nib.load(res.map_path).affine, read_volume(nrrd.image_path).affine, atol=1e-4)
    assert res.latent_map.rgb.shape == (30, 22, 12, 3) and (tmp_path / "p.png").is_file()

    # a DICOM series folder (LPS slices on disk): the map is on the series' grid, in RAS
    dicom_affine = oblique_affine((1.2, 2.0, 3.5), (20.0, -15.0, 30.0), (-40.0, 25.0, -30.0), flip_axes=(0, 1))
    folder = write_dicom_series(tmp_path / "dicom", (nifti.data * 4).astype(np.int16), dicom_affine)
    res = map_scan(checkpoint, folder, tmp_path / "dicom_map.nii.gz", png_path=None, stride_vox=3, frame=frame,
                   progress=False)  # fmt: skip
    series = read_volume(folder)
    assert nib.load(res.map_path).shape == series.shape_vox
    np.testing.assert_allclose(nib.load(res.map_path).affine, series.affine, atol=1e-4)


def test_map_scan_names_the_file_and_the_problem_on_bad_input(tmp_path, checkpoint):
    scan = make_volume_file(tmp_path, shape=(20, 16, 10), affine=SCAN_AFFINE, label=False)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        map_scan(tmp_path / "nope.pt", scan.image_path, tmp_path / "m.nii.gz", progress=False)
    with pytest.raises(ValueError, match=r"m\.png.*NIfTI"):
        map_scan(checkpoint, scan.image_path, tmp_path / "m.png", progress=False)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        map_scan(checkpoint, tmp_path / "broken.nii.gz", tmp_path / "m.nii.gz", progress=False)
    np.savez(tmp_path / "bad.frame.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.frame\.npz.*missing"):
        map_scan(checkpoint, scan.image_path, tmp_path / "m.nii.gz", frame=tmp_path / "bad.frame.npz", progress=False)


# ------------------------------------------------------------ the checkpoint's preprocessing record (issue 21)

# What the encoder below was trained with: nothing `medssl map` would guess (its old defaults were 3 mm and
# percentile scaling): a 4 mm grid, a CT window of our own and a body threshold in raw units.
TRAIN_FLAGS = ["--target-spacing-mm", "4", "--intensity", "ct_window", "--ct-window-hu", "50", "450",
               "--foreground-threshold", "50"]


@pytest.fixture(scope="module")
def recorded_checkpoint(tmp_path_factory):
    """One optimiser step of a tiny ISImed on volumes preprocessed with TRAIN_FLAGS' settings (so it has a record)."""
    import torch

    from medssl.data.preprocess import PreprocessConfig, preprocess
    from medssl.methods import create_method
    from medssl.train import TrainConfig, fit

    root = tmp_path_factory.mktemp("recorded")
    config = PreprocessConfig(target_spacing_mm=(4.0, 4.0, 4.0), intensity="ct_window", ct_window_hu=(50.0, 450.0),
                              foreground_threshold=50.0)
    vols = [preprocess(read_volume(make_volume_file(root / "train", shape=(30, 28, 20), affine=SCAN_AFFINE,
                                                    name=f"t{i}", label=False, seed=i).image_path), config)
            for i in range(2)]  # fmt: skip
    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=8, volumes_per_batch=2, patches_per_volume=4)
    fit(method, vols, TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="fp32", eval_every_epochs=9),
        root / "isimed", progress=False)
    return root / "isimed" / "checkpoints" / "last.pt", config


def _rgb(path):
    rgb = np.asanyarray(nib.load(path).dataobj)
    return np.stack([rgb["R"], rgb["G"], rgb["B"]], -1)


def test_medssl_map_without_flags_maps_as_with_the_training_flags_and_a_conflicting_flag_is_an_error(
        tmp_path, recorded_checkpoint, capsys):
    ckpt, trained = recorded_checkpoint
    scan = make_volume_file(tmp_path, shape=(34, 26, 18), affine=SCAN_AFFINE, label=False, name="new", seed=5)
    common = [str(ckpt), str(scan.image_path), "--stride-vox", "2", "--quiet", "--no-png"]
    assert main(["map", *common, "-o", str(tmp_path / "plain.nii.gz")]) == 0
    said = capsys.readouterr()
    assert "preprocessing (the checkpoint's record)" in said.out and "intensity='ct_window'" in said.out
    assert "warning" not in said.err
    assert main(["map", *common, "-o", str(tmp_path / "flags.nii.gz"), *TRAIN_FLAGS]) == 0
    plain = _rgb(tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(plain, _rgb(tmp_path / "flags.nii.gz"))
    assert (plain.sum(-1) > 0).mean() > 0.3  # a real map, not two empty ones

    # the old defaults (3 mm, percentile scaling) are no longer applied silently: they are a conflict...
    for flags, named in ((["--intensity", "percentile"], "intensity: checkpoint 'ct_window', given 'percentile'"),
                         (["--target-spacing-mm", "3"], "target_spacing_mm: checkpoint (4, 4, 4), given (3, 3, 3)")):
        out = tmp_path / "conflict.nii.gz"
        assert main(["map", *common, "-o", str(out), *flags]) == 1
        err = capsys.readouterr().err
        assert str(ckpt) in err and named in err and "--force-preprocessing" in err
        assert not out.exists() and not out.with_name("conflict.frame.npz").exists()  # nothing written
    # ...and when forced, they give another map (the input the network sees differs)
    assert main(["map", *common, "-o", str(tmp_path / "forced.nii.gz"), "--intensity", "percentile",
                 "--force-preprocessing"]) == 0
    assert "forced away from the training record" in capsys.readouterr().err
    assert not np.array_equal(_rgb(tmp_path / "forced.nii.gz"), plain)

    res = map_scan(ckpt, scan.image_path, tmp_path / "py.nii.gz", png_path=None, stride_vox=2, progress=False)
    assert res.preprocess == trained and res.preprocess_recorded
    np.testing.assert_array_equal(_rgb(res.map_path), plain)


def test_map_scan_uses_an_older_checkpoint_without_a_record_with_a_warning_listing_what_it_assumed(
        tmp_path, recorded_checkpoint, capsys):
    import torch

    ckpt, _ = recorded_checkpoint
    state = torch.load(ckpt, weights_only=True)
    del state["preprocessing"]  # as every checkpoint written before the record existed
    old = tmp_path / "old.pt"
    torch.save(state, old)
    scan = make_volume_file(tmp_path, shape=(34, 26, 18), affine=SCAN_AFFINE, label=False, name="new", seed=5)
    with pytest.warns(UserWarning, match=r"old\.pt: no preprocessing record .*written before.*assumed: "
                                         r"target_spacing_mm=\(3, 3, 3\).*intensity='percentile'"):
        res = map_scan(old, scan.image_path, tmp_path / "old.nii.gz", png_path=None, stride_vox=2, progress=False)
    assert not res.preprocess_recorded and res.preprocess.intensity == "percentile"
    # flags fill in what the old checkpoint cannot say, and are no conflict
    assert main(["map", str(old), str(scan.image_path), "-o", str(tmp_path / "o.nii.gz"), "--quiet", "--no-png",
                 "--stride-vox", "2", *TRAIN_FLAGS]) == 0
    said = capsys.readouterr()
    assert "ASSUMED" in said.out and "medssl map: warning:" in said.err and "intensity='ct_window'" in said.err
    np.testing.assert_array_equal(_rgb(tmp_path / "o.nii.gz"),
                                  _rgb(map_scan(ckpt, scan.image_path, tmp_path / "n.nii.gz", png_path=None,
                                                stride_vox=2, progress=False).map_path))  # fmt: skip
