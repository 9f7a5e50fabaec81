"""Every bad-file error is one shape (``medssl._errors.PathProblemError``): ``path``, ``problem``, the message
``"<path>: <problem>"``, picklable with its class (worker processes send them back), and still the built-in error
callers catch (``ValueError`` for unusable files, ``OSError`` for failed writes)."""

from __future__ import annotations

import pickle

import pytest

from medssl._errors import PathProblemError
from medssl.data.cache import CacheWriteError
from medssl.data.demo.fetch import ChecksumMismatchError
from medssl.data.errors import CacheEntryError, MedsslDataError, TooSmallError
from medssl.train.checkpoint import CheckpointError, CheckpointWriteError


@pytest.mark.parametrize("cls, builtin", [
    (MedsslDataError, ValueError), (TooSmallError, ValueError), (CacheEntryError, ValueError),
    (ChecksumMismatchError, ValueError), (CheckpointError, ValueError),
    (CheckpointWriteError, OSError), (CacheWriteError, OSError),
])
def test_path_problem_errors_share_one_shape(cls, builtin, tmp_path):
    path = tmp_path / "scan 1.nii.gz"
    err = cls(path, "the affine is singular")
    assert isinstance(err, PathProblemError) and isinstance(err, builtin)
    assert str(err) == f"{path}: the affine is singular" and err.path == str(path)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and (back.path, back.problem, str(back)) == (err.path, err.problem, str(err))
    with pytest.raises(builtin, match="singular"):
        raise err
