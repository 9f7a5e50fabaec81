"""Budget of the reference study: seconds per training step of every study method, against ISImed in the same run.

Each trained method of the study plan is built at the study's settings (``medssl.study.train_settings``:
the ``demo`` preset's networks and batches) and trained for ``--warmup`` + ``--steps`` steps on the study
cohort, one method at a time, in this process; the table gives the measured seconds per step, the ratio to
ISImed's (the named baseline, measured in the same run) and the time at the study's caps, both as measured
and scaled to a quiet machine through ISImed's quiet per-step time (``--quiet-isimed-s``: the README's
``make demo`` timing, 62 s for 210 steps on this 2-core CPU). A study's pretraining budget is then
``sum over methods and seeds of steps x seconds per step`` (the caps give the upper bound; early stopping
ends most units earlier, see ``runs/<run>/60_study/budget.csv``)::

    nice -n 10 .venv/bin/python benchmarks/study_budget.py --steps 8
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per method (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quiet-isimed-s", type=float, default=62.0 / 210, help="ISImed s/step on a quiet machine")
    ap.add_argument("--methods", nargs="*", default=None)
    args = ap.parse_args()

    from medssl.data.source import open_data
    from medssl.methods import get_method_class
    from medssl.presets import build_run
    from medssl.study import load_study, study_methods, train_settings
    from medssl.train import fit

    settings, _ = load_study("study")
    methods = args.methods or [m for m in study_methods(settings["methods"]) if get_method_class(m).trains]
    if "isimed" in methods:  # the baseline first
        methods = ["isimed", *[m for m in methods if m != "isimed"]]
    d = settings["data"]
    data = open_data(d["source"], n_subjects=d["n_subjects"], cohort_seed=d["cohort_seed"],
                     target_spacing_mm=d["target_spacing_mm"], progress=False)
    train = data.volumes("train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            m_over, t_over = train_settings(settings, m)
            cap = t_over["epochs"] * t_over["steps_per_epoch"]
            timed = {**t_over, "epochs": 1, "steps_per_epoch": args.warmup + args.steps, "early_stopping": None,
                     "log_every": 1}
            model, config = build_run(m, settings["preset"], method_overrides=m_over, train_overrides=timed, seed=0)
            t0 = time.perf_counter()
            fit(model, train, config, f"{tmp}/{m}", progress=False, tensorboard=False)
            wall = time.perf_counter() - t0
            log = pd.read_json(f"{tmp}/{m}/metrics.jsonl", lines=True)
            t = log[log["split"] == "train"].set_index("step")["time_s"]
            per_step = (t.loc[args.warmup + args.steps] - t.loc[args.warmup]) / args.steps
            rows.append({"method": m, "s_per_step": per_step, "cap_steps": cap, "wall_s": wall})
            print(f"{m}: {per_step:.3f} s/step ({1 / per_step:.2f} steps/s) over {args.steps} steps", flush=True)
    table = pd.DataFrame(rows)
    base = table.set_index("method").loc["isimed", "s_per_step"] if "isimed" in set(table.method) else float("nan")
    table["ratio_vs_isimed"] = table["s_per_step"] / base
    table["at_cap_min (measured)"] = table["s_per_step"] * table["cap_steps"] / 60
    table["at_cap_min (quiet)"] = table["ratio_vs_isimed"] * args.quiet_isimed_s * table["cap_steps"] / 60
    print("\n" + table.round(3).to_string(index=False))
    seeds = len(settings["seeds"])
    print(f"\npretraining at the caps, {seeds} seeds: {seeds * table['at_cap_min (measured)'].sum():.0f} min as "
          f"measured here, {seeds * table['at_cap_min (quiet)'].sum():.0f} min on a quiet machine (ISImed "
          f"{args.quiet_isimed_s:.3f} s/step); early stopping ends units before their caps")


if __name__ == "__main__":
    main()
