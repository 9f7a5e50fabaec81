"""The one error shape for bad files: ``path`` names the file, ``problem`` says why, the message is
``"<path>: <problem>"``. Each public error (:class:`medssl.data.errors.MedsslDataError`,
:class:`medssl.train.checkpoint.CheckpointError`, ...) mixes it into the built-in error it is
(``ValueError``, ``OSError``), so ``except ValueError`` and ``except OSError`` keep working."""

from __future__ import annotations

__all__ = ["PathProblemError"]


class PathProblemError(Exception):
    """A file cannot be used or written. ``path`` names the file, ``problem`` says why."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable (worker processes send errors back), whatever the subclass
        return (type(self), (self.path, self.problem))
