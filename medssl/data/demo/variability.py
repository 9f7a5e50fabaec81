"""Inter-subject variability for the demo cohort: organ sizes and shapes, stronger warps, intensities and noise.

The plain demo cohort warps one CT with a random affine plus a gentle elastic field, so every
subject's liver is the template's liver moved and slightly bent. ``build_demo_cohort(...,
variability="study")`` (``open_data("demo:study")``) adds, per subject:

- **organ-specific size and shape**: every organ in :attr:`VariabilitySettings.organs` gets its
  own scale per world axis, ``s = size * shape`` (``size`` log-uniform in ``organ_size``, each
  axis' ``shape`` log-uniform in ``organ_shape``), applied around the organ's centroid by a smooth
  field built from the template's label map::

      M(z) = z + sum_k w_k(z) (1/s_k - 1) * (z - c_k)

  ``w_k`` is organ k's mask smoothed with a Gaussian whose width grows with the organ
  (``smooth_fraction`` of its equivalent radius, at least ``smooth_min_mm``), normalised where
  organs overlap; where ``w_k = 1`` the subject's organ is the template's scaled by ``s_k``. The
  field is sampled on a ``morph_grid_mm`` grid over the template and interpolated trilinearly;
  the stored samples *are* the deformation, so correspondences stay exact. A draw whose field
  would fold (Jacobian determinant below ``min_jacobian``) is shrunk towards the identity
  until it does not.
- **stronger smooth nonlinear warps and affine ranges**: :attr:`VariabilitySettings.cohort`
  replaces :class:`~medssl.data.demo.config.CohortConfig` values (elastic displacement, rotation,
  scaling, translation); a base warp that would fold is shrunk the same way.
- **intensities and noise**: a per-organ attenuation offset (``organ_hu``, e.g. a fatty or a dense
  liver), a smooth additive shading over the volume (``bias_hu`` on a coarse grid, cubic), and
  wider ranges of the global scale, shift and noise (``cohort``).

The subject's deformation is then ``T(x) = M(T_base(x))`` (:class:`ComposedDeformation`; subject
world mm -> template world mm), stored in the subject's ``deformation.npz`` (base fields plus
``morph_*``) and read back by :func:`load_deformation`; labels are warped with the image, so
ground truth is kept. Everything is drawn from a stream of its own (the subject's seed with an
extra spawn key), so a plain cohort is bit-identical to what it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from medssl.data.demo.deformation import SubjectDeformation, _as_points

__all__ = ["VARIABILITY", "ComposedDeformation", "GridWarp", "VariabilitySettings", "load_deformation",
           "variability_settings"]

_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "gallbladder", "stomach", "pancreas", "urinary_bladder",
           "iliopsoas_left", "iliopsoas_right", "autochthon_left", "autochthon_right")


@dataclass(frozen=True)
class VariabilitySettings:
    """How far subjects differ (see the module docstring). Recorded in ``cohort.json`` with the cohort config."""

    name: str = "study"
    organs: tuple[str, ...] = _ORGANS
    organ_size: tuple[float, float] = (0.8, 1.25)  # isotropic scale per organ (log-uniform): volume x0.51 .. x1.95
    organ_shape: tuple[float, float] = (0.9, 1.1)  # extra scale per world axis (log-uniform)
    smooth_fraction: float = 0.4  # Gaussian sigma of an organ's weight, as a share of its equivalent radius
    smooth_min_mm: float = 8.0
    morph_grid_mm: float = 6.0
    min_jacobian: float = 0.3  # no subject's warp compresses a region below this volume ratio (no folding)
    organ_hu: tuple[float, float] = (-25.0, 25.0)  # attenuation offset per organ (uniform)
    organ_hu_organs: tuple[str, ...] = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas",
                                        "iliopsoas_left", "iliopsoas_right", "autochthon_left", "autochthon_right")
    bias_hu: float = 30.0  # peak of the smooth additive shading (s.d. bias_hu / 2, clipped)
    bias_control_points: int = 4
    # CohortConfig values replaced for this cohort (the plain demo's: elastic 9 mm, rotation 10 deg,
    # scaling 0.10, translation 10 mm, intensity scale 0.05, shift 20 HU, noise 10-20 HU)
    cohort: dict[str, Any] = field(default_factory=lambda: {
        "elastic_mm": 16.0, "rotation_deg": 12.0, "scaling": 0.12, "translation_mm": 15.0,
        "intensity_scale": 0.12, "intensity_shift_hu": 40.0, "noise_hu": [5.0, 35.0]})

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VariabilitySettings":
        values = {k: tuple(v) if isinstance(v, list) and k != "cohort" else v for k, v in data.items()}
        return cls(**values)


VARIABILITY: dict[str, VariabilitySettings] = {"study": VariabilitySettings()}


def variability_settings(name: str | None) -> VariabilitySettings | None:
    """The named settings (``None`` or ``"none"``: the plain cohort)."""
    if name in (None, "", "none"):
        return None
    try:
        return VARIABILITY[str(name)]
    except KeyError:
        raise ValueError(f"unknown demo cohort variability {name!r}; known: none, {', '.join(VARIABILITY)}") from None


# ---------------------------------------------------------------------------- the deformation


@dataclass(frozen=True)
class GridWarp:
    """``M(z) = z + m(z)``, ``m`` sampled on a grid (``affine``: grid index -> world mm), trilinear, constant outside."""

    affine: np.ndarray
    displacement_mm: np.ndarray  # (3, X, Y, Z)

    def displacement(self, points_mm: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        g = (inv[:3, :3] @ points_mm.T + inv[:3, 3:4])  # (3, N) grid coordinates
        return np.stack([ndi.map_coordinates(self.displacement_mm[c], g, order=1, mode="nearest")
                         for c in range(3)], axis=1)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        p = _as_points(points_mm)
        return p + self.displacement(p)

    def inverse(self, points_mm: np.ndarray, tol_mm: float = 1e-5, max_iter: int = 500) -> np.ndarray:
        """``M^-1(y)`` by the fixed point ``z <- y - m(z)`` (``m``'s Lipschitz constant is below 1: no folding)."""
        y = _as_points(points_mm)
        z = y.copy()
        for _ in range(max_iter):
            z_new = y - self.displacement(z)
            step = np.abs(z_new - z).max() if len(z) else 0.0
            z = z_new
            if step < tol_mm:
                break
        residual = np.linalg.norm(self(z) - y, axis=1).max() if len(z) else 0.0
        if residual > 10 * tol_mm:
            raise RuntimeError(f"inverting the organ warp did not converge (residual {residual:.3g} mm)")
        return z

    def min_jacobian(self) -> float:
        """Smallest det(dM/dz) over the grid (finite differences along the grid axes)."""
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        rot = self.affine[:3, :3] / spacing  # grid axes as world unit vectors
        grads = [np.gradient(self.displacement_mm[c], *spacing) for c in range(3)]  # d m_c / d (grid axis)
        j = np.stack([np.stack(g, -1) for g in grads], -2) @ rot.T  # d m_c / d world
        return float(np.linalg.det(j + np.eye(3)).min())


@dataclass(frozen=True)
class ComposedDeformation:
    """``T(x) = M(T_base(x))``: subject world mm -> template world mm (the study cohort's subjects).

    Same interface as :class:`~medssl.data.demo.deformation.SubjectDeformation` (``__call__``,
    ``inverse``, ``save``), which ``DemoCohort.correspondence`` and the synthesis use.
    """

    base: SubjectDeformation
    morph: GridWarp

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        return self.morph(self.base(points_mm))

    def on_grid(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """``T`` at every voxel centre of a grid, ``(N, 3)`` in C order: the base's fast grid path, then ``M``."""
        return self.morph(self.base.on_grid(shape, affine))

    def inverse(self, points_mm: np.ndarray, tol_mm: float = 1e-4, max_iter: int = 300) -> np.ndarray:
        z = self.morph.inverse(points_mm, tol_mm=tol_mm / 10)
        x = self.base.inverse(z, tol_mm=tol_mm / 10, max_iter=max_iter)
        residual = np.linalg.norm(self(x) - _as_points(points_mm), axis=1).max() if len(x) else 0.0
        if residual > 10 * tol_mm:
            raise RuntimeError(f"inverting the subject deformation did not converge (residual {residual:.3g} mm)")
        return x

    def save(self, path: str | os.PathLike, **extra: np.ndarray) -> None:
        fields_ = {k: np.asarray(v) for k, v in asdict(self.base).items()}
        np.savez_compressed(path, **fields_, morph_affine=self.morph.affine,
                            morph_displacement_mm=self.morph.displacement_mm.astype(np.float32), **extra)


def load_deformation(path: str | os.PathLike) -> "SubjectDeformation | ComposedDeformation":
    """A subject's stored deformation: a :class:`ComposedDeformation` where the file holds an organ warp."""
    base = SubjectDeformation.load(path)
    with np.load(path, allow_pickle=False) as z:
        if "morph_displacement_mm" not in z.files:
            return base
        morph = GridWarp(np.asarray(z["morph_affine"], np.float64),
                         np.asarray(z["morph_displacement_mm"], np.float32).astype(np.float64))
    return ComposedDeformation(base, morph)


# ---------------------------------------------------------------------------- drawing a subject's variability


def cohort_overrides(settings: VariabilitySettings) -> dict[str, Any]:
    """The :class:`CohortConfig` values this variability replaces (tuples where the config has tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.cohort.items()}


def subject_rng(job: dict) -> np.random.Generator:
    """The subject's own variability stream: its cohort seed with one more spawn key (the base stream is untouched)."""
    return np.random.default_rng(np.random.SeedSequence(job["entropy"], spawn_key=(*job["spawn_key"], 7)))


def organ_weights(template: dict[str, Any], settings: VariabilitySettings) -> dict[str, Any]:
    """Per organ: centroid (world mm) and smoothed, overlap-normalised weight on the morph grid (cached per template)."""
    key = ("_variability_weights", settings.organs, settings.smooth_fraction, settings.smooth_min_mm,
           settings.morph_grid_mm)
    if key in template:
        return template[key]
    label, affine = template["label"], template["affine"]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ids = {name: int(i) for i, name in template["names"].items()}
    stride = np.maximum(1, np.round(settings.morph_grid_mm / spacing).astype(int))
    grid_affine = affine @ np.diag([*stride, 1.0])
    organs, weights = [], []
    for name in settings.organs:
        mask = label == ids.get(name, -1)
        if not mask.any():
            continue
        vol_mm3 = mask.sum() * np.prod(spacing)
        radius = (3 * vol_mm3 / (4 * np.pi)) ** (1 / 3)
        sigma_mm = max(settings.smooth_min_mm, settings.smooth_fraction * radius)
        w = ndi.gaussian_filter(mask.astype(np.float32), sigma_mm / spacing, mode="constant")
        w = np.clip(w / max(float(w.max()), 1e-6) * 1.0, 0, 1)  # a thin organ's smoothed peak rises to 1
        centroid = affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]
        organs.append({"organ": name, "centroid_mm": centroid, "sigma_mm": float(sigma_mm),
                       "volume_ml": float(vol_mm3 / 1000)})
        weights.append(w[::stride[0], ::stride[1], ::stride[2]])
    w = np.stack(weights)
    w = w / np.maximum(1.0, w.sum(0, keepdims=True))  # overlapping organs share, never exceed 1
    shape = w.shape[1:]
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    points = (grid_affine[:3, :3] @ ijk + grid_affine[:3, 3:4]).T.reshape(*shape, 3)
    out = {"organs": organs, "weights": w.astype(np.float32), "grid_affine": grid_affine, "points_mm": points}
    template[key] = out
    return out


def draw_organ_warp(rng: np.random.Generator, template: dict[str, Any], settings: VariabilitySettings
                    ) -> tuple[GridWarp, list[dict[str, Any]]]:
    """A subject's organ warp ``M`` and the per-organ scales it applies (shrunk until it does not fold)."""
    ow = organ_weights(template, settings)
    n = len(ow["organs"])
    log_size = rng.uniform(np.log(settings.organ_size[0]), np.log(settings.organ_size[1]), n)
    log_shape = rng.uniform(np.log(settings.organ_shape[0]), np.log(settings.organ_shape[1]), (n, 3))
    shrink = 1.0
    for _ in range(12):
        scales = np.exp(shrink * (log_size[:, None] + log_shape))  # (n, 3) per world axis
        disp = np.zeros((3, *ow["weights"].shape[1:]), dtype=np.float64)
        for k, organ in enumerate(ow["organs"]):
            rel = ow["points_mm"] - organ["centroid_mm"]  # (X, Y, Z, 3)
            disp += np.moveaxis(ow["weights"][k][..., None] * (1.0 / scales[k] - 1.0) * rel, -1, 0)
        warp = GridWarp(ow["grid_affine"], disp.astype(np.float32).astype(np.float64))  # what is stored is used
        if warp.min_jacobian() >= settings.min_jacobian:
            break
        shrink *= 0.8
    else:
        raise RuntimeError("could not draw an organ warp that does not fold; lower organ_size/organ_shape")
    records = [{"organ": o["organ"], "scale_xyz": [round(float(v), 4) for v in scales[k]],
                "volume_factor": round(float(np.prod(scales[k])), 4)} for k, o in enumerate(ow["organs"])]
    return warp, records


def _min_jacobian_of(deformation: SubjectDeformation, shape: Sequence[int], affine: np.ndarray, step: int = 4) -> float:
    """Smallest det(dT/dx) of ``deformation`` on every ``step``-th voxel of a subject grid."""
    sub = np.indices([max(2, (n + step - 1) // step) for n in shape], dtype=np.float64).reshape(3, -1) * step
    pts = (affine[:3, :3] @ sub + affine[:3, 3:4]).T
    h = 0.5  # mm, central differences
    cols = []
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        cols.append((deformation(pts + e) - deformation(pts - e)) / (2 * h))
    j = np.stack(cols, axis=-1)  # (N, 3, 3): dT_c / dx_d
    return float(np.linalg.det(j).min())


def compose(job: dict, cfg: Any, base: SubjectDeformation, template: dict[str, Any], shape: Sequence[int],
            affine: np.ndarray) -> tuple[ComposedDeformation, np.random.Generator, dict[str, Any]]:
    """The subject's full deformation (base warp, shrunk if it folds, then the organ warp), its rng and record."""
    settings = VariabilitySettings.from_json(cfg.variability)
    rng = subject_rng(job)
    base_shrink = 1.0
    while _min_jacobian_of(base, shape, affine) < settings.min_jacobian and base_shrink > 0.2:
        base = replace(base, displacement_mm=base.displacement_mm * 0.8)
        base_shrink *= 0.8
    morph, organs = draw_organ_warp(rng, template, settings)
    record = {"name": settings.name, "organ_scales": organs, "elastic_shrink": round(base_shrink, 4),
              "organ_warp_min_jacobian": round(morph.min_jacobian(), 4)}
    return ComposedDeformation(base, morph), rng, record


def vary_intensities(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                     cfg: Any, names: dict[int, str], record: dict[str, Any]) -> np.ndarray:
    """Per-organ attenuation offsets and a smooth shading, in template HU (before the global scale and shift)."""
    settings = VariabilitySettings.from_json(cfg.variability)
    ids = {name: int(i) for i, name in names.items()}
    offsets = {}
    out = image.astype(np.float32, copy=True)
    for organ in settings.organ_hu_organs:
        oid = ids.get(organ)
        if oid is None or not np.any(label == oid):
            continue
        delta = float(rng.uniform(*settings.organ_hu))
        soft = ndi.gaussian_filter((label == oid).astype(np.float32), 0.7)  # no stair-step edge
        out += np.float32(delta) * soft
        offsets[organ] = round(delta, 2)
    g = settings.bias_control_points
    coarse = np.clip(rng.normal(0.0, settings.bias_hu / 2, (g, g, g)), -settings.bias_hu, settings.bias_hu)
    shading = ndi.zoom(coarse, [n / g for n in image.shape], order=3, mode="nearest", grid_mode=True)
    shading = shading[: image.shape[0], : image.shape[1], : image.shape[2]]
    out += shading.astype(np.float32)
    record.update(organ_hu=offsets, bias_hu_range=[round(float(shading.min()), 2), round(float(shading.max()), 2)])
    return out
