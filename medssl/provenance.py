"""Where the data behind a result came from: the statement every report must show.

The demo cohort is not a multi-subject dataset. It is one real CT warped many
times, with labels that a model (not a radiologist) produced and lesions we
painted in. Anyone reading a demo result must be told so, in the notebook, the
HTML report and the CLI output alike; :func:`provenance_statement` is the one
place that text lives.
"""

from __future__ import annotations

import os

__all__ = ["DEMO_PROVENANCE", "provenance_statement"]

DEMO_PROVENANCE: str = (
    "Data provenance: the demo cohort is SYNTHETIC. Every subject is a random smooth deformation "
    "(affine + elastic) of ONE real abdomen-pelvis CT, the TotalSegmentator 2.18.0 example volume "
    "(tests/reference_files/example_ct.nii.gz of the PyPI source distribution, Apache-2.0 license), "
    "with intensity jitter and noise added. Its organ labels are TotalSegmentator model outputs "
    "(example_seg_fast_force_split.nii.gz), not manual masks. The lesions are synthetic ellipsoids "
    "inserted into liver, spleen and kidneys. The external cases (the original CT, an abdominal MR and "
    "a DICOM CT from the same package) are real images whose labels are also model outputs. Results on "
    "this cohort show that the code works; they are not evidence of clinical performance."
)


def provenance_statement(source: str | os.PathLike = "demo") -> str:
    """The provenance text for a data source: the demo statement, or a note naming the user's folder."""
    if str(source) == "demo":
        return DEMO_PROVENANCE
    return (
        f"Data provenance: user-provided data read from {os.fspath(source)}. Labels and splits are as "
        "given in that collection's files and the run's manifest; their origin (manual or model-made) "
        "is not known to medssl."
    )
