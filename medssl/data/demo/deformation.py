"""The deformation model of a synthetic subject: ``T(x) = c + A (x - c) + t + u(x)`` (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

# --------------------------------------------------------------------------- deformations


@dataclass(frozen=True)
class SubjectDeformation:
    """``T(x) = c + A (x - c) + t + u(x)``: subject world mm -> template world mm.

    Attributes:
        centre_mm: ``c``, (3,).
        matrix: ``A`` (rotation @ diag(scales)), (3, 3).
        translation_mm: ``t``, (3,).
        grid_origin_mm: world position of control point (0, 0, 0), (3,).
        grid_spacing_mm: control point spacing along world x, y, z, (3,).
        displacement_mm: ``u`` at the control points, (3, G, G, G); interpolated
            with cubic splines (``scipy.ndimage.map_coordinates``, order 3, mode
            "nearest"), so ``u`` is smooth and defined everywhere.
    """

    centre_mm: np.ndarray
    matrix: np.ndarray
    translation_mm: np.ndarray
    grid_origin_mm: np.ndarray
    grid_spacing_mm: np.ndarray
    displacement_mm: np.ndarray

    @classmethod
    def identity(cls, centre_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> "SubjectDeformation":
        return cls(np.asarray(centre_mm, float), np.eye(3), np.zeros(3), np.zeros(3), np.ones(3),
                   np.zeros((3, 2, 2, 2)))  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SubjectDeformation":
        with np.load(path, allow_pickle=False) as z:
            return cls(*(np.asarray(z[k], dtype=np.float64) for k in
                         ("centre_mm", "matrix", "translation_mm", "grid_origin_mm", "grid_spacing_mm",
                          "displacement_mm")))  # fmt: skip

    def save(self, path: str | os.PathLike, **extra: np.ndarray) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in asdict(self).items()}, **extra)

    def displacement(self, points_mm: np.ndarray) -> np.ndarray:
        """``u(x)`` in mm, (N, 3) -> (N, 3)."""
        g = ((points_mm - self.grid_origin_mm) / self.grid_spacing_mm).T + _PAD  # (3, N) padded control-grid coords
        coeffs = self._spline_coefficients()
        return np.stack(
            [ndi.map_coordinates(coeffs[c], g, order=3, mode="nearest", prefilter=False) for c in range(3)], axis=1
        )

    def _spline_coefficients(self) -> list[np.ndarray]:
        """The cubic B-spline coefficients of ``u``, computed once per deformation.

        What ``map_coordinates(..., order=3, mode="nearest")`` computes on every call (the grid
        padded by edge values, then ``spline_filter``); done once here because the inverse calls
        ``u`` hundreds of times on a 6^3 grid, where that filtering dominated the cost.
        """
        cached = self.__dict__.get("_coeffs")
        if cached is None:
            cached = [ndi.spline_filter(np.pad(np.asarray(d, np.float64), _PAD, mode="edge"), order=3, mode="nearest")
                      for d in self.displacement_mm]  # fmt: skip
            object.__setattr__(self, "_coeffs", cached)  # a cache, not a field: frozen dataclass
        return cached

    def on_grid(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """``T`` at every voxel centre of a grid (``affine``: voxel -> world mm), ``(N, 3)`` in C order.

        Equal to ``self(world centres)`` (to 1e-9 mm; tested). Where the grid's axes are the world
        axes (a diagonal ``affine``, as for every demo subject) ``u`` is evaluated as a tensor
        product of 1D cubic B-spline weights on the same coefficients ``map_coordinates`` uses,
        which is far cheaper than interpolating a million points one by one; any other grid takes
        the general path.
        """
        shape = tuple(int(n) for n in shape)
        affine = np.asarray(affine, np.float64)
        m = affine[:3, :3]
        if not np.allclose(m, np.diag(np.diag(m))):
            ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
            return self((m @ ijk + affine[:3, 3:4]).T)
        axes_mm = [affine[d, d] * np.arange(n) + affine[d, 3] for d, n in enumerate(shape)]  # world mm per voxel axis
        coeffs = self._spline_coefficients()
        weights = [_bspline_weights((a - self.grid_origin_mm[d]) / self.grid_spacing_mm[d] + _PAD, coeffs[0].shape[d])
                   for d, a in enumerate(axes_mm)]  # fmt: skip
        along = [np.reshape(a - self.centre_mm[d], [-1 if k == d else 1 for k in range(3)]) for d, a in enumerate(axes_mm)]
        out = np.empty((*shape, 3))
        for c, coeff in enumerate(coeffs):
            u = np.tensordot(weights[0], coeff, axes=(1, 0))  # (X, Gy, Gz)
            u = np.tensordot(u, weights[1], axes=(1, 1))  # (X, Gz, Y)
            u = np.tensordot(u, weights[2], axes=(1, 1))  # (X, Y, Z)
            u += self.centre_mm[c] + self.translation_mm[c]
            for d in range(3):  # the affine part, one axis at a time
                u += self.matrix[c, d] * along[d]
            out[..., c] = u
        return out.reshape(-1, 3)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """``T(x)``: subject world mm (N, 3) -> template world mm (N, 3)."""
        p = _as_points(points_mm)
        return self.centre_mm + (p - self.centre_mm) @ self.matrix.T + self.translation_mm + self.displacement(p)

    def inverse(self, points_mm: np.ndarray, tol_mm: float = 1e-4, max_iter: int = 200) -> np.ndarray:
        """``T^-1(y)``: template world mm (N, 3) -> subject world mm (N, 3).

        Fixed-point iteration ``x <- c + A^-1 (y - c - t - u(x))``, which converges
        because ``u`` varies slowly (its Lipschitz constant times ``|A^-1|`` is well
        below 1 for the cohort's settings: ~9 mm control displacements over ~60 mm
        spacing). It stops when the step falls below ``tol_mm``; the final residual
        ``|T(x) - y|`` is checked to be below ``10 * tol_mm`` (well under 1 mm; the
        tests measure the round trip).

        Raises:
            RuntimeError: the iteration did not converge (a folding deformation).
        """
        y = _as_points(points_mm)
        a_inv = np.linalg.inv(self.matrix)
        base = y - self.centre_mm - self.translation_mm
        x = self.centre_mm + base @ a_inv.T
        for _ in range(max_iter):
            x_new = self.centre_mm + (base - self.displacement(x)) @ a_inv.T
            step = np.abs(x_new - x).max() if len(x) else 0.0
            x = x_new
            if step < tol_mm:
                break
        residual = np.linalg.norm(self(x) - y, axis=1).max() if len(x) else 0.0
        if residual > 10 * tol_mm:
            raise RuntimeError(f"inverting the subject deformation did not converge (residual {residual:.3g} mm)")
        return x


_PAD = 12  # control points of edge padding before the spline filter (what scipy pads for mode "nearest")


def _bspline_weights(coords: np.ndarray, n_coeff: int) -> np.ndarray:
    """``(len(coords), n_coeff)``: cubic B-spline weights of each coefficient at each coordinate (coefficient units).

    The weights ``map_coordinates(order=3)`` applies to prefiltered coefficients: the 4 knots from
    ``floor(x) - 1``, ``beta3(x - k)``; coordinates lie inside the padded grid, so no boundary rule applies.
    """
    x = np.asarray(coords, np.float64)
    out = np.zeros((len(x), n_coeff))
    start = np.floor(x).astype(np.int64) - 1
    rows = np.arange(len(x))
    for j in range(4):
        k = start + j
        t = np.abs(x - k)
        w = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
        ok = (k >= 0) & (k < n_coeff)
        out[rows[ok], k[ok]] = w[ok]
    return out


def _as_points(points_mm: Any) -> np.ndarray:
    p = np.asarray(points_mm, dtype=np.float64)
    if p.ndim == 1 and p.shape[0] == 3:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points_mm must have shape (N, 3), got {np.shape(points_mm)}")
    return p


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed so det = +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _euler_rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx
