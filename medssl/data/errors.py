"""Errors for bad input. Every message names the file and the problem."""

from __future__ import annotations

from medssl._errors import PathProblemError


class SettingError(ValueError):
    """A medssl setting (an environment variable such as ``MEDSSL_MAX_VOLUME_BYTES``) is invalid.

    Not about any data file: a scan stops at once with this one message instead of blaming every file.
    """


class MedsslDataError(PathProblemError, ValueError):
    """A data file cannot be used. ``path`` names the file, ``problem`` says why."""


class UnreadableFileError(MedsslDataError):
    """The file is missing, corrupt or in an unsupported format."""


class DimensionalityError(MedsslDataError):
    """The image is not 3D (2D, or 4D+ with more than one non-channel axis)."""


class GeometryError(MedsslDataError):
    """Spacing is zero, negative or NaN, or the affine is singular/non-finite."""


class NonFiniteVoxelsError(MedsslDataError):
    """The image holds NaN or Inf voxels."""


class LabelGridMismatchError(MedsslDataError):
    """A label's shape or affine differs from its image's."""


class ChannelCountError(MedsslDataError):
    """The image has another number of channels than the rest of the dataset (a model takes one)."""


class TooSmallError(MedsslDataError):
    """The volume is smaller than the patch size after preprocessing."""


class TooLargeError(MedsslDataError):
    """Reading or resampling the volume would need more memory than the bound (see ``medssl.data.limits``)."""


class EmptyForegroundError(MedsslDataError):
    """Foreground cropping found no foreground."""


class DatasetScanError(ValueError):
    """A dataset scan found bad files. ``problems`` lists every one of them."""

    def __init__(self, problems: list[MedsslDataError]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} bad file(s) found; nothing was trained or cached for them:\n{lines}\n"
            "Fix or remove them, or pass on_error='skip' to skip them with a report."
        )


class CacheEntryError(MedsslDataError):
    """A cache entry is missing, corrupt, stale, or was made with other settings or from other files."""
