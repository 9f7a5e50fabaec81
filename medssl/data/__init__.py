"""Reading, preprocessing, caching and organising volumes.

- ``volume``: :class:`Volume` (image, affine, labels); ``io``: reading NIfTI, NRRD, MetaImage, DICOM, writing NIfTI.
- ``headers``, ``limits``, ``validate``, ``errors``: checks that name the file and the problem before reading.
- ``preprocess``: RAS orientation, resampling, intensity scaling, foreground crop; ``body``: body masks.
- ``cache``, ``npy``: the preprocessed-volume cache (memory-mappable arrays).
- ``datasets``: manifests, patient-grouped splits, the pre-training dataset scan.
- ``spec``, ``source``: a run's data spec and the one entry point that opens it (demo cohort or a folder).
- ``demo``: the demo data (TotalSegmentator examples and the synthetic cohort warped from one).
"""

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
