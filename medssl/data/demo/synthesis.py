"""Synthesising one subject: warp the template CT and labels, jitter intensities, add noise, insert lesions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medssl.data.demo.config import CohortConfig, _config_from_json
from medssl.data.demo.deformation import SubjectDeformation, _euler_rotation, _random_rotation
from medssl.data.demo.fetch import CT_LABEL_FILE, load_example_label_names

# --------------------------------------------------------------------------- subject synthesis

# Bumped whenever the same CohortConfig would synthesise different subjects; a cohort built by
# another version is rebuilt (cohort.json records it). 2: lesions 10-30 mm with organ-specific CT contrast.
SYNTHESIS_VERSION = 2


_TEMPLATE: dict[str, Any] = {}


def _load_template(examples_dir: str) -> dict[str, Any]:
    ref = Path(examples_dir)
    ct_img = nib.load(str(ref / "example_ct.nii.gz"))
    names = load_example_label_names(ref, CT_LABEL_FILE) or {}
    return {
        "ct": np.asarray(ct_img.dataobj, dtype=np.float32),
        "label": np.asarray(nib.load(str(ref / CT_LABEL_FILE)).dataobj).astype(np.uint8),
        "affine": np.asarray(ct_img.affine, dtype=np.float64),
        "names": names,
    }


def _init_worker(examples_dir: str) -> None:
    _TEMPLATE.clear()
    _TEMPLATE.update(_load_template(examples_dir))


def _subject_grid(template_shape: Sequence[int], template_affine: np.ndarray, spacing_mm: float):
    """The template's field of view at ``spacing_mm`` (same origin voxel and axes). Returns (shape, affine)."""
    t_spacing = np.linalg.norm(template_affine[:3, :3], axis=0)
    factor = spacing_mm / t_spacing
    shape = tuple(int(np.floor((n - 1) / f + 1e-6)) + 1 for n, f in zip(template_shape, factor))
    affine = template_affine.copy()
    affine[:3, :3] = template_affine[:3, :3] * factor  # scale each column (voxel axis)
    return shape, affine


def _world_centres(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World mm of every voxel centre, C order, (N, 3)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


def _draw_deformation(rng: np.random.Generator, cfg: CohortConfig, shape, affine, centre_mm) -> SubjectDeformation:
    angles = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    scales = rng.uniform(1 - cfg.scaling, 1 + cfg.scaling, 3)
    translation = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    corners = _world_centres((2, 2, 2), affine @ np.diag([shape[0] - 1, shape[1] - 1, shape[2] - 1, 1]))
    lo, hi = corners.min(0), corners.max(0)
    g = cfg.elastic_control_points
    disp = np.clip(rng.normal(0.0, cfg.elastic_mm / 2, (3, g, g, g)), -cfg.elastic_mm, cfg.elastic_mm)
    return SubjectDeformation(
        centre_mm=np.asarray(centre_mm, float),
        matrix=_euler_rotation(angles) @ np.diag(scales),
        translation_mm=translation,
        grid_origin_mm=lo,
        grid_spacing_mm=(hi - lo) / (g - 1),
        displacement_mm=disp,
    )


def _draw_lesion_contrast(rng: np.random.Generator, cfg: CohortConfig, organ: str) -> dict:
    """How a lesion in ``organ`` changes the image (see :class:`CohortConfig`).

    ``{"kind": "hypodense" | "hyperdense", "delta_hu": d}`` adds ``d`` to the parenchyma;
    ``{"kind": "cyst", "cyst_hu": h}`` replaces it by ``h`` (before the subject's intensity
    scale and shift, like the template's own values).
    """
    if organ.startswith("kidney"):
        return {"kind": "cyst", "cyst_hu": float(rng.uniform(*cfg.cyst_hu))}
    if organ == "liver" and rng.random() < cfg.liver_hyperdense_share:
        return {"kind": "hyperdense", "delta_hu": float(rng.uniform(*cfg.lesion_hyper_delta_hu))}
    return {"kind": "hypodense", "delta_hu": float(rng.uniform(*cfg.lesion_hypo_delta_hu))}


def _draw_lesion_diameters(rng: np.random.Generator, cfg: CohortConfig) -> np.ndarray:
    """Three diameters (mm): a size uniform in ``lesion_diameter_mm``, each axis within ``1 +- lesion_axis_ratio``
    of it, clipped to the range."""
    lo, hi = cfg.lesion_diameter_mm
    size = rng.uniform(lo, hi)
    return np.clip(size * rng.uniform(1 - cfg.lesion_axis_ratio, 1 + cfg.lesion_axis_ratio, 3), lo, hi)


def _insert_lesions(rng, image, label, affine, organ_ids: dict[str, int], cfg: CohortConfig, scale: float, shift: float):
    """Paint ``lesions_per_subject`` ellipsoid lesions into organs of ``image`` (in place). Returns (lesion map, records).

    ``image`` holds the subject's intensities before noise (after its scale and shift, which
    a cyst's water value follows). Each lesion's centre is drawn among organ voxels at least
    its largest radius away from the organ's border (and from earlier lesions), so the
    ellipsoid lies inside the organ; it shrinks to fit a thin organ, never below
    ``lesion_diameter_mm[0]``, else the draw is repeated (8 tries). The change is weighted by
    ``w = (1 - tanh((r - 1) / edge)) / 2`` (``r``: the ellipsoid's normalised radius; 1/2 on its
    surface), restricted to the organ: a smooth edge. The lesion map holds ``r <= 1``.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lesion_map = np.zeros(label.shape, dtype=np.uint8)
    records = []
    n = int(rng.integers(cfg.lesions_per_subject[0], cfg.lesions_per_subject[1] + 1))
    weights = dict(zip(cfg.lesion_organs, cfg.lesion_organ_weights))
    organs = [o for o in cfg.lesion_organs if o in organ_ids and weights[o] > 0 and np.any(label == organ_ids[o])]
    p = np.asarray([weights[o] for o in organs], dtype=np.float64)
    for k in range(n):
        for _attempt in range(8):
            if not organs:
                break
            organ = organs[int(rng.choice(len(organs), p=p / p.sum()))]
            oid = organ_ids[organ]
            radii = _draw_lesion_diameters(rng, cfg) / 2
            contrast = _draw_lesion_contrast(rng, cfg, organ)
            placed = _place_one_lesion(rng, image, label, lesion_map, affine, spacing, oid, radii, k + 1, cfg,
                                       contrast, scale, shift)  # fmt: skip
            if placed is not None:
                records.append({**placed, "organ": organ, "organ_id": oid})
                break
    return lesion_map, records


def _place_one_lesion(rng, image, label, lesion_map, affine, spacing, oid, radii, lesion_id, cfg, contrast, scale,
                      shift):  # fmt: skip
    r_min = cfg.lesion_diameter_mm[0] / 2
    organ = label == oid
    idx = np.argwhere(organ)
    margin = int(np.ceil(cfg.lesion_diameter_mm[1] / spacing.min())) + 2
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    free = organ[box] & (lesion_map[box] == 0)
    depth_mm = ndi.distance_transform_edt(free, sampling=spacing)  # distance to organ border or other lesion
    half_vox = 0.5 * spacing.max()
    need = radii.max() + half_vox
    if depth_mm.max() < need:
        fit = depth_mm.max() - half_vox
        if fit < r_min:
            return None
        radii = np.maximum(radii * (fit / radii.max()), r_min)
        need = depth_mm.max() - 1e-6
    candidates = np.argwhere(depth_mm >= need)
    centre_vox = candidates[int(rng.integers(len(candidates)))] + lo
    centre_mm = affine[:3, :3] @ centre_vox + affine[:3, 3]
    rot = _random_rotation(rng)
    # local box around the lesion, wide enough for the smooth edge and the surrounding shell
    half = np.ceil(radii.max() * max(1 + 3 * cfg.lesion_edge, 2.5) / spacing).astype(int) + 1
    a = np.maximum(centre_vox - half, 0)
    b = np.minimum(centre_vox + half + 1, label.shape)
    local = tuple(slice(p, q) for p, q in zip(a, b))
    sub_shape = tuple(int(q - p) for p, q in zip(a, b))
    sub_affine = affine.copy()
    sub_affine[:3, 3] = affine[:3, :3] @ a + affine[:3, 3]
    pts = _world_centres(sub_shape, sub_affine) - centre_mm
    r_norm = np.linalg.norm((pts @ rot) / radii, axis=1).reshape(sub_shape)  # rot columns = ellipsoid axes
    in_organ = label[local] == oid
    free_local = in_organ & (lesion_map[local] == 0)
    shell = free_local & (r_norm >= 1.5) & (r_norm <= 2.5)  # parenchyma around the lesion
    weight = 0.5 * (1.0 - np.tanh((r_norm - 1.0) / cfg.lesion_edge)) * in_organ
    before = image[local].copy()
    if contrast["kind"] == "cyst":
        water = np.float32(contrast["cyst_hu"] * scale + shift)
        image[local] = before + (weight * (water - before)).astype(image.dtype)
    else:
        image[local] = before + (contrast["delta_hu"] * weight).astype(image.dtype)
    inside = (r_norm <= 1.0) & free_local
    lesion_map[local][inside] = lesion_id
    core = inside & (r_norm <= 0.5)
    surround = float(np.median(before[shell])) if shell.any() else float("nan")
    core_hu = float(image[local][core].mean()) if core.any() else float(image[local][inside].mean())
    return {
        "id": lesion_id,
        "centre_mm": [round(float(v), 3) for v in centre_mm],
        "diameters_mm": [round(float(2 * v), 3) for v in radii],
        "axes": np.round(rot, 6).tolist(),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in contrast.items()},
        # measured before noise: the lesion's core (r <= 1/2) against the parenchyma around it (1.5 <= r <= 2.5)
        "surround_hu": round(surround, 2) if np.isfinite(surround) else None,
        "contrast_hu": round(core_hu - surround, 2) if np.isfinite(surround) else None,
        "voxels": int(inside.sum()),
        "volume_ml": round(float(inside.sum() * np.prod(spacing)) / 1000, 3),
    }


def _synthesize_subject(job: dict) -> dict:
    """Make one subject from the template in ``_TEMPLATE``; write its files into ``job['dir']``."""
    from medssl.data.io import write_nifti

    cfg = _config_from_json(job["config"])
    rng = np.random.default_rng(np.random.SeedSequence(job["entropy"], spawn_key=tuple(job["spawn_key"])))
    t = _TEMPLATE
    shape, affine = _subject_grid(t["ct"].shape, t["affine"], cfg.spacing_mm)
    centre_mm = t["affine"][:3, :3] @ ((np.asarray(t["ct"].shape) - 1) / 2) + t["affine"][:3, 3]
    deformation = _draw_deformation(rng, cfg, shape, affine, centre_mm)
    if cfg.variability:  # organ sizes and shapes (its own rng stream): medssl.data.demo.variability
        from medssl.data.demo import variability

        deformation, var_rng, var_record = variability.compose(job, cfg, deformation, t, shape, affine)

    template_mm = deformation.on_grid(shape, affine)  # (N, 3), T at every voxel centre
    t_inv = np.linalg.inv(t["affine"])
    coords = t_inv[:3, :3] @ template_mm.T + t_inv[:3, 3:4]  # (3, N) template voxel coordinates
    image = ndi.map_coordinates(t["ct"], coords, order=1, mode="constant", cval=cfg.background_hu).reshape(shape)
    label = ndi.map_coordinates(t["label"], coords, order=0, mode="constant", cval=0).reshape(shape)
    # sign: derivatives are along voxel axes, whose handedness is det(affine)'s sign
    min_jac = _min_jacobian_det(template_mm.reshape(shape + (3,)), np.linalg.norm(affine[:3, :3], axis=0))
    min_jac *= np.sign(np.linalg.det(affine[:3, :3]))
    del template_mm, coords
    if cfg.variability:  # per-organ attenuation and a smooth shading, before the global scale and shift
        image = variability.vary_intensities(var_rng, image, label, affine, cfg, t["names"], var_record)

    scale = rng.uniform(1 - cfg.intensity_scale, 1 + cfg.intensity_scale)
    shift = rng.uniform(-cfg.intensity_shift_hu, cfg.intensity_shift_hu)
    image = image * np.float32(scale) + np.float32(shift)
    organ_ids = {name: i for i, name in t["names"].items()}
    lesion_map, lesions = _insert_lesions(rng, image, label, affine, organ_ids, cfg, float(scale), float(shift))
    noise_hu = rng.uniform(*cfg.noise_hu)
    image += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    image = np.clip(np.rint(image), -32768, 32767).astype(np.int16)

    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(out / "image.nii.gz", image, affine)
    write_nifti(out / "label.nii.gz", label.astype(np.uint8), affine)
    write_nifti(out / "lesion.nii.gz", lesion_map, affine)
    deformation.save(out / "deformation.npz", subject_affine=affine, subject_shape_vox=np.asarray(shape),
                     template_affine=t["affine"])  # fmt: skip
    return {
        "case_id": job["case_id"],
        "split": job["split"],
        "shape_vox": list(shape),
        "spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "intensity_scale": round(float(scale), 5),
        "intensity_shift_hu": round(float(shift), 3),
        "noise_hu": round(float(noise_hu), 3),
        "min_jacobian_det": round(float(min_jac), 4),
        "n_labels": int(len(np.unique(label)) - 1),
        "lesions": lesions,
        "lesion_voxels": int(np.count_nonzero(lesion_map)),
        **({"variability": var_record} if cfg.variability else {}),
    }


def _min_jacobian_det(field_mm: np.ndarray, spacing_mm: np.ndarray) -> float:
    """Smallest det(dT/dx) over the grid (central differences); > 0 means the warp does not fold."""
    sub = field_mm[::2, ::2, ::2]  # every 2nd voxel: the warp is smooth on that scale
    grads = [np.gradient(sub[..., c], *(2 * spacing_mm)) for c in range(3)]  # grads[c][d] = dT_c/dx_d
    j = np.stack([np.stack(g, -1) for g in grads], -2)  # (..., 3, 3), derivatives along voxel axes
    return float(np.linalg.det(j).min())
