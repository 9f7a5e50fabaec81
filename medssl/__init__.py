"""medssl: self-supervised learning from the intrinsic spatial information of 3D medical images."""

from medssl._alloc import tune_malloc

__version__ = "0.1.0"

tune_malloc()

__all__ = ["__version__", "tune_malloc"]
