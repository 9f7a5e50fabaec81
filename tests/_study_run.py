"""A tiny study for tests/test_study.py, in its own process.

Usage: ``python _study_run.py PLAN_JSON RUNS_ROOT RUN [KILL_UNIT KILL_STEP]``. With ``KILL_UNIT`` (a unit's
folder name path, e.g. ``seed1/isimed``) the process SIGKILLs itself right after that unit's training step
``KILL_STEP``, the way a machine that loses power stops: no handler runs, files are as they were.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch


def _kill_at(unit: str, step: int) -> None:
    from medssl.train import loop

    real = loop._Trainer.optimizer_step

    def optimizer_step(self, batch, sample_s):
        real(self, batch, sample_s)
        if Path(self.run_dir).as_posix().endswith(unit) and self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    loop._Trainer.optimizer_step = optimizer_step


def main(argv: list[str]) -> int:
    plan, runs_root, run = json.loads(Path(argv[0]).read_text()), Path(argv[1]), argv[2]
    if len(argv) > 3:
        _kill_at(argv[3], int(argv[4]))
    torch.set_num_threads(1)  # bit-reproducible runs to compare
    from medssl.study import run_study

    result = run_study(plan, run, runs_root=runs_root, progress=False)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
