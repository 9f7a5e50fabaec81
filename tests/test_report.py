"""The run report reads the notebooks' tables and lines them up per method."""

import json

import numpy as np
import pandas as pd
import pytest

from medssl.report import collect_results, comparison_table, write_report


def _fake_run(root, methods=("isimed", "simclr")):
    run = root / "r"
    (run / "20_latent_space").mkdir(parents=True)
    (run / "30_linear_probe" / "lesion").mkdir(parents=True)
    (run / "30_linear_probe" / "liver").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [*methods, "random-init"]
    spearman = dict(zip(names, rng.uniform(0, 1, len(names))))
    pd.DataFrame({"method": names, "spearman": [spearman[n] for n in names],
                  "abs_err_median_mm": rng.uniform(1, 50, len(names))}).to_csv(run / "20_latent_space" / "fidelity.csv", index=False)
    dec = [{"method": n, "axis": ax, "r2": rng.uniform(), "error_mm": rng.uniform(1, 80)} for n in names for ax in "x y z xyz".split()]
    pd.DataFrame(dec).to_csv(run / "20_latent_space" / "decoding.csv", index=False)
    probe = [{"method": n, "metric": m, "mean": rng.uniform(), "std": rng.uniform(0, 0.1), "n_folds": 10}
             for n in [*names, "raw-intensity"] for m in ("auc", "f1")]
    pd.DataFrame(probe).to_csv(run / "30_linear_probe" / "lesion" / "probe_summary.csv", index=False)
    organ_probe = pd.DataFrame(probe).assign(mean=lambda d: d["mean"] / 2)  # a different table for the organ task
    organ_probe.to_csv(run / "30_linear_probe" / "liver" / "probe_summary.csv", index=False)
    for m in methods:
        (run / m / "checkpoints").mkdir(parents=True)
        (run / m / "checkpoints" / "last.pt").write_bytes(b"")
        recs = [{"step": s, "loss": 10.0 / s, "time_s": 6.0 * s} for s in range(1, 11)] + [
            {"step": 10, "split": "val", "loss": 1.2, "effective_rank": 7.5}]
        (run / m / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    return run, dec, probe, spearman


def test_comparison_table_takes_the_xyz_decoding_row_and_the_auc_probe_row(tmp_path):
    run, dec, probe, spearman = _fake_run(tmp_path)
    res = collect_results(run)
    assert res.methods == ["isimed", "simclr"]
    assert "20_latent_space/correspondence.csv" in res.missing
    t = comparison_table(res).set_index("method")
    assert list(t.index[:2]) == ["isimed", "simclr"]  # pretrained methods first
    for d in dec:
        if d["axis"] == "xyz":
            assert t.loc[d["method"], "decoding_r2"] == pytest.approx(d["r2"])
    for p in probe:
        if p["metric"] == "auc":
            assert t.loc[p["method"], "probe_auc_lesion"] == pytest.approx(p["mean"])
            assert t.loc[p["method"], "probe_auc_liver"] == pytest.approx(p["mean"] / 2)
    assert t.loc["simclr", "fidelity_spearman"] == pytest.approx(spearman["simclr"])
    assert t.loc["isimed", "train_minutes"] == pytest.approx(1.0)  # 60 s of logged training time
    assert np.isnan(t.loc["raw-intensity", "fidelity_spearman"])  # a probe-only baseline has no fidelity


def test_report_html_states_provenance_and_lists_what_is_missing(tmp_path):
    run, *_ = _fake_run(tmp_path)
    out = write_report(run, provenance="SYNTHETIC cohort statement")
    text = out.read_text(encoding="utf-8")
    assert out == run / "40_report" / "report.html"
    assert "SYNTHETIC cohort statement" in text and "correspondence.csv" in text and "isimed" in text


def test_collect_results_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        collect_results(tmp_path / "nope")
