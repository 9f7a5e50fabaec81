"""Headline tables: the probe's notes test each method against its twin, the shortcuts and the control only;
the control sentence says when a task measures nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medssl.evaluate.headlines import control_sentence, kind_of, probe_headline
from medssl.evaluate.stats import paired_tests


def test_probe_notes_hold_the_method_x_baseline_family_and_each_methods_own_twin():
    rng = np.random.default_rng(0)
    means = {"isimed": 0.75, "simclr": 0.70, "random-init[smallcnn]": 0.60, "raw-intensity": 0.62,
             "position-cubic": 0.64, "supervised-cnn": 0.92}
    units = {m: mu + rng.normal(0, 0.02, 8) for m, mu in means.items()}
    table = pd.DataFrame([{"method": m, "metric": "auc", "mean": u.mean(), "std": u.std(ddof=1), "n": 8,
                           "pooled": np.nan} for m, u in units.items()])
    tests = paired_tests(units)  # every pair, as the probe computes them
    twins = {"isimed": "random-init[smallcnn]", "simclr": "random-init[smallcnn]"}
    head = probe_headline(table, tests, "test", "subject", twins=twins).set_index("method")
    assert kind_of("supervised-cnn") == "control"
    note = head.loc["isimed", "note"]
    # 2 methods x (twin, raw-intensity, position-cubic, control) = 8 comparisons, not the 15 pairs of 6 rows
    assert note.count("Holm over 8 comparisons") == 4
    assert "isimed beats random-init[smallcnn]" in note and "isimed stays below the control supervised-cnn" in note
    assert "simclr" not in note  # methods are not compared with each other
    assert head.loc["random-init[smallcnn]", "note"] == "" and head.loc["random-init[smallcnn]", "kind"] == "baseline"


def test_a_control_near_chance_says_the_task_measures_nothing():
    near = control_sentence({"isimed": 0.52, "registration (affine)": 0.55}, chance=0.5, best=1.0, what="AUC")
    assert "measures nothing" in near and "registration (affine)" in near
    solved = control_sentence({"registration (affine)": 11.5, "chance": 170.0}, chance=170.0, best=8.9,
                              what="the median error (mm)")
    assert "can be solved" in solved and "measures nothing" not in solved
    assert control_sentence({"isimed": 0.9}, chance=0.5, best=1.0, what="AUC") == ""  # no control, nothing said
