"""Which subjects an evaluation chooses on and which it scores, and what to do with a small or unregistered cohort.

The protocol: choices on the validation split, scores once on the
test split. Real collections are not always that tidy: a handful of scans may give no test
split, or a single held-out subject, and scans from different patients do not share a
world frame. :func:`evaluation_subjects` picks the best protocol the data allows and says,
in words, what it had to give up; :func:`body_centred_mm` expresses positions relative to
each subject's body so that nothing compares raw scanner coordinates across unregistered
subjects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from medssl.data.volume import Volume
from medssl.geometry import vox_to_world
from medssl.sampling.regions import foreground_mask

__all__ = ["EvaluationSubjects", "StepNotApplicable", "evaluation_subjects", "body_centre_mm", "body_centred_mm",
           "choose_probe_target"]


class StepNotApplicable(RuntimeError):
    """This evaluation cannot run on this data (e.g. no held-out subject has the probe's target).

    Raised from a notebook, it makes ``medssl pipeline`` record the step as "not applicable"
    with the reason and go on with the next notebook, instead of stopping the run.
    """


@dataclass
class EvaluationSubjects:
    """The subjects of an evaluation and the protocol they allow.

    Attributes:
        fit: subjects for choices and for fitting probes (may be empty: choices then by CV
            within ``score``).
        score: subjects whose numbers are reported.
        fit_split, score_split: their split names (``score_split`` is ``"train"`` when nothing
            was held out).
        registered: whether the subjects share one world frame.
        notes: what the protocol had to give up, in words (empty for the full protocol).
    """

    fit: list[Volume]
    score: list[Volume]
    fit_split: str
    score_split: str
    registered: bool
    notes: list[str] = field(default_factory=list)

    @property
    def by_split(self) -> dict[str, list[Volume]]:
        """``{split: volumes}`` of the non-empty splits, fitting split first."""
        out = {}
        if self.fit:
            out[self.fit_split] = self.fit
        out[self.score_split] = self.score
        return out

    @property
    def all(self) -> list[Volume]:
        return [*self.fit, *self.score]

    def describe(self) -> str:
        head = (f"choices on {self.fit_split} ({len(self.fit)} subjects), scored once on {self.score_split} "
                f"({len(self.score)} subjects)") if self.fit else f"scored on {self.score_split} ({len(self.score)} subjects)"
        frame = "subjects share one world frame" if self.registered else "subjects do NOT share a world frame"
        return "; ".join([head, frame, *self.notes])


def evaluation_subjects(data: Any, fit_split: str = "val", score_split: str = "test") -> EvaluationSubjects:
    """The best protocol ``data`` (a :class:`~medssl.data.source.DataSource`) allows, with notes on what it gave up.

    - both splits hold subjects: the full protocol;
    - only one of them does: it is scored, and choices are made by subject-grouped
      cross-validation within it (said in the notes);
    - neither does: the training subjects are scored (optimistic: the method saw them).
    """
    splits = set(data.splits)
    fit = data.volumes(fit_split) if fit_split in splits else []
    score = data.volumes(score_split) if score_split in splits else []
    registered = bool(getattr(data, "registered", False))
    notes: list[str] = []
    if not registered:
        notes.append("positions are compared relative to each subject's body (centroid of its body mask), "
                     "never in raw scanner coordinates across subjects")
    if fit and score:
        return EvaluationSubjects(fit, score, fit_split, score_split, registered, notes)
    if fit or score:
        only, name = (score, score_split) if score else (fit, fit_split)
        missing = fit_split if score else score_split
        notes.append(f"no {missing!r} subjects: the {name!r} subjects are scored and choices are made by "
                     "subject-grouped cross-validation within them (or, with fewer than 3 subjects, within each "
                     "subject by slabs along z)")
        return EvaluationSubjects([], only, fit_split, name, registered, notes)
    train = data.volumes("train") if "train" in splits else data.volumes(None)
    notes.append("no held-out subjects at all: the TRAINING subjects are scored, which is optimistic (the "
                 "methods saw them while pretraining)")
    return EvaluationSubjects([], train, fit_split, "train", registered, notes)


def body_centre_mm(volume: Volume) -> np.ndarray:
    """``(3,)`` world mm of the centroid of the volume's body mask."""
    ijk = np.argwhere(foreground_mask(volume))
    return vox_to_world(volume.affine, ijk.mean(axis=0))[0]


def body_centred_mm(centres_mm: np.ndarray, case_ids: Sequence[str], volumes: Sequence[Volume]) -> np.ndarray:
    """Patch centres relative to their own subject's body centroid, ``(N, 3)`` mm (RAS axes kept).

    What "position" means across subjects that do not share a world frame: a chest CT at
    z = +683 mm and another at -658 mm are then comparable, up to body size and pose.
    """
    centres = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    cases = np.asarray(case_ids).astype(str)
    by_id = {str(v.case_id): v for v in volumes}
    missing = sorted(set(cases.tolist()) - set(by_id))
    if missing:
        raise ValueError(f"body_centred_mm needs the volumes of cases {missing}")
    out = centres.copy()
    for case in np.unique(cases):
        out[cases == case] -= body_centre_mm(by_id[case])
    return out


def choose_probe_target(volumes: Sequence[Volume], task: str = "auto", organ: str = "liver") -> str:
    """The probe's target for ``task`` (``"lesion"``, ``"organ"`` or ``"auto"``), checked against the data.

    ``"auto"``: the lesion maps when any subject has one, else ``organ`` when a label map names it.
    Raises a ``ValueError`` that lists what the data offers when the target is nowhere.
    """
    from medssl.sampling.sets import target_mask

    if task not in ("auto", "lesion", "organ"):
        raise ValueError(f"task must be 'auto', 'lesion' or 'organ', got {task!r}")
    has_lesion = any("lesion" in v.aux and np.asarray(v.aux["lesion"]).any() for v in volumes)
    if task == "lesion" or (task == "auto" and has_lesion):
        if not has_lesion:
            raise StepNotApplicable("task='lesion' but no evaluated subject has a lesion map with lesions; "
                                    "use task='organ' (with organ=...)")
        return "lesion"
    names = sorted({n for v in volumes for n in (v.label_names or {}).values()})
    for v in volumes:
        try:
            if target_mask(v, organ).any():
                return organ
        except ValueError:
            continue
    raise StepNotApplicable(f"no evaluated subject has a labelled {organ!r} (structures named in their label maps: "
                            f"{names or 'none'}); choose another organ, or give label names (e.g. an MSD dataset.json)")
