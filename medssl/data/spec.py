"""The data of a run in one place: which cases, split how, preprocessed at which spacing.

``00_data.ipynb`` writes the run's :class:`DataSpec` (``runs/<run>/00_data/data_spec.json``, through
:meth:`medssl.rundir.RunDir.write_data_spec`); every later notebook, ``medssl train`` and the evaluations open
the data from it (:meth:`medssl.rundir.RunDir.open_data`), so a run's notebooks cannot disagree about the
cohort, its size, its spacing, its layout, whether it is registered or how it was split. A notebook's
``data`` parameter (and a plan's ``-p data ...``) overrides single fields for one notebook; a run without a
spec (a notebook run on its own) uses the defaults below, the demo's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from medssl._config import check_overrides

if TYPE_CHECKING:  # pragma: no cover
    from medssl.data.source import DataSource

__all__ = ["DataSpec", "DataSpecError"]


class DataSpecError(ValueError):
    """A data spec file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class DataSpec:
    """The :func:`~medssl.data.source.open_data` settings that define a run's data.

    Attributes:
        source: ``"demo"``, ``"demo:<variability>"`` (``"demo:study"``) or a folder of scans.
        layout: the folder's layout (``auto``, ``msd``, ``totalseg``, ``autopet``, ``brats``, ``folder``);
            ignored for the demo.
        n_subjects, cohort_seed: the demo cohort's size and seed (which synthetic subjects exist).
        split_seed: seed of a folder's patient-grouped split.
        target_spacing_mm: isotropic voxel size after preprocessing, mm.
        registered: the folder's subjects share one world frame (the demo always does).
    """

    source: str = "demo"
    layout: str = "auto"
    n_subjects: int = 48
    cohort_seed: int = 0
    split_seed: int = 0
    target_spacing_mm: float = 3.0
    registered: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source))  # a pathlib.Path from Python: kept as text
        if not self.target_spacing_mm > 0:
            raise ValueError(f"target_spacing_mm must be > 0, got {self.target_spacing_mm!r}")
        if self.n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {self.n_subjects!r}")

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "DataSpec":
        """This spec with fields replaced (unknown names and wrong types raise, naming the field)."""
        if not overrides:
            return self
        values = {k: (str(v) if k == "source" and isinstance(v, os.PathLike) else v) for k, v in overrides.items()}
        check_overrides(DataSpec, values, "data")
        return replace(self, **values)

    def open(self, **kwargs: Any) -> "DataSource":
        """:func:`~medssl.data.source.open_data` with these settings (``kwargs``: ``patch_size_vox``, ``progress``,
        ``on_error``, ...)."""
        from medssl.data.source import open_data

        return open_data(**asdict(self), **kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "DataSpec":
        """The spec in ``path``; a file that is not one is a :class:`DataSpecError` naming it."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataSpecError(f"{path}: cannot read the run's data spec ({e})") from None
        if not isinstance(values, dict):
            raise DataSpecError(f"{path}: a data spec is a JSON object of {[f.name for f in fields(cls)]}")
        try:
            return cls().with_overrides(values)
        except (TypeError, ValueError) as e:
            raise DataSpecError(f"{path}: {e}") from None
