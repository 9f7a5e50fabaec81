"""Reading, preprocessing, caching and organising volumes."""

from medssl.data.errors import (
    DatasetScanError,
    DimensionalityError,
    EmptyForegroundError,
    GeometryError,
    LabelGridMismatchError,
    MedsslDataError,
    NonFiniteVoxelsError,
    TooLargeError,
    TooSmallError,
    UnreadableFileError,
)
from medssl.data.volume import Volume

__all__ = [
    "Volume",
    "MedsslDataError",
    "UnreadableFileError",
    "DimensionalityError",
    "GeometryError",
    "NonFiniteVoxelsError",
    "LabelGridMismatchError",
    "TooSmallError",
    "TooLargeError",
    "EmptyForegroundError",
    "DatasetScanError",
]
