"""The interval study is one plan: the five SimSiam variants with the same seed, then 15 and the evaluations."""

from __future__ import annotations

from medssl import pipeline
from medssl.methods import create_method, list_methods, make_config
from medssl.methods.simsiam import IOU_STUDY


def test_iou_study_plan_pretrains_the_five_intervals_then_measures_them_and_evaluates():
    plan = pipeline.load_plan("iou_study")
    methods = pipeline.plan_methods(plan["methods"])  # "iou_study": named, not imported, until the plan runs
    assert methods == list(IOU_STUDY)  # the thesis's order, every one registered
    assert set(methods) <= set(list_methods())
    intervals = [(make_config(m).iou_min, make_config(m).iou_max) for m in methods]
    assert intervals == [(0.0, 0.0), (0.0001, 0.3), (0.3, 0.6), (0.6, 1.0), (0.0, 1.0)]
    steps = pipeline.expand_plan(plan, "study", overrides={"seed": 3})
    names = [s.step for s in steps]
    assert names[0] == "00_data" and names[1:6] == ["10_pretrain"] * 5 and names[6] == "15_iou_intervals"
    assert [s.method for s in steps[1:6]] == methods
    assert {s.parameters["seed"] for s in steps[1:6]} == {3}  # the same seed for every interval
    assert {s.parameters["preset"] for s in steps[1:6]} == {"demo"}
    from medssl.presets import preset

    budgets = {(t.epochs * t.steps_per_epoch, create_method(m, **o).patches_per_step)
               for m in methods for o, t in [preset(m, "demo")]}
    assert budgets == {(210, 192)}  # the other demo methods' steps and distinct patches (168 steps until issue 16)
    evals = [s.step for s in pipeline.expand_plan(pipeline.load_plan("demo"), "d")][-len(names) + 7:]
    assert names[7:] == evals  # then the demo's evaluation notebooks
    assert steps[6].parameters["methods"] == methods
