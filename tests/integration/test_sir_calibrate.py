"""The SIR example's calibration (examples/sir/calibrate.yaml) through the real
`tidegate run`: a reduced budget checks the summary, the Parquet rows and the study; the
full budget (slow) checks that it recovers the true beta and gamma."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SIR_DIR, read_dataset, tidegate, write_spec
from tests.search_journal import told_once

TRUE = {"beta": 0.3, "gamma": 0.1}  # make_observed.py's TRUE_PARAMS


def calibrate_spec(tmp_path: Path, **search: Any) -> Path:
    """The shipped calibrate.yaml, its search fields overridden by ``search``, its code
    path the example's directory."""
    spec = yaml.safe_load((SIR_DIR / "calibrate.yaml").read_text())
    spec["parameters"]["search"].update(search)
    spec["code_paths"] = [str(SIR_DIR)]
    return write_spec(tmp_path / "calibrate.yaml", spec)


def run(spec: Path, out: Path) -> dict[str, Any]:
    proc = tidegate("run", spec, "--output", out, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary


def test_a_short_calibration_writes_every_trial_once_and_reports_the_best(
    tmp_path: Path,
) -> None:
    """40 trials of the shipped search: 40 params in the output, each with both targets
    and 5 replicates' seeds, told once each; the summary's best is the lowest epidemic
    loss in targets/epidemic, at a point inside the space."""
    out = tmp_path / "out"
    summary = run(calibrate_spec(tmp_path, trials=40), out)
    assert summary["state"] == "succeeded"
    assert summary["params"]["total"] == summary["params"]["ok"] == 40
    search = summary["search"]
    assert {k: search[k] for k in ("objective", "sampler", "trials", "told", "failed")} == {
        "objective": "epidemic", "sampler": "tpe", "trials": 40, "told": 40, "failed": 0}
    assert search["parallel"] >= 1

    params = read_dataset(out / "params")
    ids = [p["param_id"] for p in params]
    assert len(ids) == len(set(ids)) == 40
    for p in params:
        assert 0.05 <= p["param_beta"] <= 0.6 and 0.02 <= p["param_gamma"] <= 0.3
    epidemic = read_dataset(out / "targets" / "epidemic")
    incidence = read_dataset(out / "targets" / "incidence")
    assert sorted(r["param_id"] for r in epidemic) == sorted(ids)
    assert sorted(r["param_id"] for r in incidence) == sorted(ids)
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in epidemic)
    assert all(json.loads(r["diagnostics"])["n_replicates"] == 5 for r in epidemic)

    lowest = min(epidemic, key=lambda r: r["loss"])
    best = search["best"]
    assert best["param_id"] == lowest["param_id"]
    assert best["loss"] == pytest.approx(lowest["loss"])
    row = next(p for p in params if p["param_id"] == best["param_id"])
    assert best["values"] == {"beta": row["param_beta"], "gamma": row["param_gamma"]}
    assert told_once(out / "search.journal") == 40


@pytest.mark.slow
def test_the_shipped_calibration_recovers_beta_and_gamma_within_10_percent(
    tmp_path: Path,
) -> None:
    """examples/sir/calibrate.yaml as shipped (300 trials): the best trial's beta and
    gamma are each within 10% of the values observed_incidence.csv was made with."""
    spec = yaml.safe_load((SIR_DIR / "calibrate.yaml").read_text())
    spec["code_paths"] = [str(SIR_DIR)]
    summary = run(write_spec(tmp_path / "calibrate.yaml", spec), tmp_path / "out")
    assert summary["search"]["told"] == 300
    best = summary["search"]["best"]["values"]
    for name, truth in TRUE.items():
        assert abs(best[name] - truth) / truth < 0.10, (name, best)
