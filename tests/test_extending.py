"""A new method is a new file: it appears in the registry, the shared contract tests, the pipeline's
method list and a run's method list, with no edit anywhere else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TOY = '''
"""A toy method: regress each patch centre's distance to the volume centre (nothing else edited)."""
from dataclasses import dataclass

import torch

from medssl.methods.base import Method, MethodConfig, StepOutput, backbone_from_config, register_method, \\
    uniform_sampler_from_config


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    weight: float = 1.0


@register_method("toy")
class Toy(Method):
    """Toy: squared norm of the embedding regressed onto the centre's distance from the origin (cm)."""

    Config = ToyConfig
    family = "distance regression"
    paper = "none"
    presets = {"demo": {"method": {"weight": 2.0}}}

    def __init__(self, config):
        super().__init__(config)
        self.backbone = backbone_from_config(config)
        self.sampler = uniform_sampler_from_config(config)

    def training_step(self, batch):
        e = self.backbone(batch.patches)
        loss = self.config.weight * ((e.pow(2).sum(1) - batch.centres_mm.norm(dim=1) / 10.0) ** 2).mean()
        return StepOutput(loss=loss, logs={"loss": float(loss.detach())})
'''


@pytest.mark.slow
def test_a_method_file_dropped_into_the_package_is_found_everywhere(tmp_path):
    pkg = tmp_path / "src"
    shutil.copytree(REPO / "medssl", pkg / "medssl", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "medssl" / "methods" / "toy.py").write_text(TOY)
    env = {**os.environ, "PYTHONPATH": f"{pkg}{os.pathsep}{REPO}", "MEDSSL_RUNS": str(tmp_path / "runs")}
    check = f'''
import medssl, medssl.methods as m
assert medssl.__file__.startswith({str(pkg)!r}), medssl.__file__
assert "toy" in m.list_methods() and "toy" in m.list_methods(demo=True, trains=True), m.list_methods()
from medssl.pipeline import PLANS, expand_plan, load_plan
steps = expand_plan(load_plan("demo"), "r")
assert any(s.method == "toy" for s in steps), [s.method for s in steps]
from medssl.presets import preset
assert preset("toy", "demo")[0]["weight"] == 2.0
from medssl.rundir import RunDir
rd = RunDir("r"); rd.checkpoint("toy").parent.mkdir(parents=True); rd.checkpoint("toy").write_bytes(b"x")
assert rd.trained_methods() == ["toy"]
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    # the shared contract tests, unchanged, run against the copy (whose conftest puts the copy first on sys.path)
    (pkg / "tests" / "methods").mkdir(parents=True)
    for f in ("conftest.py", "helpers.py", "methods/test_shared_method_contract.py"):
        shutil.copy(REPO / "tests" / f, pkg / "tests" / f)
    (pkg / "pytest.ini").write_text("[pytest]\npythonpath = .\n")
    contract = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "toy", "tests/methods"],
        env={**env, "PYTHONPATH": str(pkg)}, capture_output=True, text=True, cwd=pkg)
    assert contract.returncode == 0, contract.stdout[-3000:] + contract.stderr[-2000:]
    n_passed = int(contract.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert n_passed == 8, contract.stdout[-3000:]  # all eight contract tests of a trained method ran on the toy, none skipped
