"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lesion_cohort(notebook_data_dir, tmp_path_factory):
    """A small demo-like cohort built with the real synthesis, once per session: 24 subjects (14 train / 4 val /
    6 test) at 3 mm, 10-30 mm lesions with CT contrast. Returns ``(cohort, {split: volumes})``.

    Read by ``test_lesion_task.py`` and ``test_position_confound.py``; both modules are in the xdist group
    ``lesion_cohort`` (``make test`` distributes with ``--dist loadgroup``), so one worker builds it.
    """
    from medssl.data.demo import build_demo_cohort, fetch_totalseg_examples

    with pytest.MonkeyPatch.context() as mp:  # never the user's folders; restored for later tests on this worker
        mp.setenv("MEDSSL_DATA", str(notebook_data_dir))
        mp.delenv("MEDSSL_CACHE", raising=False)
        cohort = build_demo_cohort(n_subjects=24, split_counts=(14, 4, 6), seed=0, spacing_mm=3.0,
                                   out_dir=tmp_path_factory.mktemp("lesions") / "cohort", progress=False,
                                   examples_dir=fetch_totalseg_examples(progress=False))  # fmt: skip
        vols = {s: cohort.volumes(s, progress=False) for s in ("train", "val", "test")}
    return cohort, vols
