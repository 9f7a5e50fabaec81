"""The demo data: real TotalSegmentator example volumes, and a synthetic cohort warped from one of them.

Two steps, both cached and both no-ops the second time:

1. :func:`fetch_totalseg_examples` downloads the TotalSegmentator 2.18.0 source
   distribution from PyPI with ``pip download`` (the only registry we may use),
   checks its pinned sha256 and extracts the few real volumes under
   ``tests/reference_files/`` (Apache-2.0). It also works out which organ each
   label id names (by overlap with the per-structure masks that ship alongside).
2. :func:`build_demo_cohort` warps the real abdomen CT and its 61-class label
   map jointly with a random affine + smooth elastic deformation per subject,
   jitters intensities, adds noise and inserts ellipsoid lesions into liver,
   spleen and kidneys. Each subject's deformation is stored, so cross-subject
   correspondences are known exactly (:meth:`DemoCohort.correspondence`).

Deformation convention: ``T_s`` maps a subject's world point ``x`` (mm) to the
template's world point::

    T_s(x) = c + A_s (x - c) + t_s + u_s(x)

with ``c`` the template's centre, ``A_s`` a rotation times a per-axis scaling,
``t_s`` a translation and ``u_s`` a displacement (mm) interpolated with cubic
splines from a coarse control grid (``G^3`` points spanning the subject's field
of view). Subject voxel ``x`` holds the template's CT (linear) and label
(nearest) at ``T_s(x)``. Inverting ``T_s`` (needed to go template -> subject) is
a fixed-point iteration, see :meth:`SubjectDeformation.inverse`.

Modules: :mod:`~medssl.data.demo.fetch` (download, label naming),
:mod:`~medssl.data.demo.deformation` (``T_s``), :mod:`~medssl.data.demo.config`
(:class:`CohortConfig`), :mod:`~medssl.data.demo.synthesis` (one subject with its
lesions) and :mod:`~medssl.data.demo.cohort` (assembly, :class:`DemoCohort`).
"""

from medssl.data.demo.cohort import DemoCohort, build_demo_cohort, default_cohort_dir
from medssl.data.demo.config import CohortConfig
from medssl.data.demo.deformation import SubjectDeformation
from medssl.data.demo.fetch import (
    CT_LABEL_FILE as CT_LABEL_FILE,
)
from medssl.data.demo.fetch import (
    TOTALSEG_LICENSE as TOTALSEG_LICENSE,
)
from medssl.data.demo.fetch import (
    TOTALSEG_SDIST_SHA256,
    TOTALSEG_VERSION,
    ChecksumMismatchError,
    DemoFetchError,
    fetch_totalseg_examples,
    load_example_label_names,
)

__all__ = [
    "TOTALSEG_VERSION",
    "TOTALSEG_SDIST_SHA256",
    "ChecksumMismatchError",
    "DemoFetchError",
    "fetch_totalseg_examples",
    "load_example_label_names",
    "CohortConfig",
    "SubjectDeformation",
    "DemoCohort",
    "build_demo_cohort",
    "default_cohort_dir",
]
