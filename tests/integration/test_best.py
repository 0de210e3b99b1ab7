"""`tidegate best OUTPUT_DIR` on real outputs: a grid and a small search, each written
once by a real `tidegate run` on an embedded LocalCluster, then ranked. The expected
ranking is computed here from the Parquet read back with pyarrow, and a search's trial
numbers from its study read with Optuna, not with tidegate's code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, tidegate, write_spec
from tests.integration.test_search import search_job
from tests.search_journal import trials
from tidegate.cli import main

# The bowl of test_search (its minimum at x=0.3, y=-0.2; x > 0.85 raises), with two
# more targets: one ranking the other way, one with the same loss for every param.
MODEL = '''
import random


def model(params, seed):
    x, y = float(params["x"]), float(params["y"])
    if x > 0.85:
        raise ValueError("unstable region")
    noise = random.Random(seed).gauss(0.0, 0.01)
    return {"obs": {"v": [(x - 0.3) ** 2 + (y + 0.2) ** 2 + noise]}}


def fit(returns):
    return sum(r.table("obs").column("v")[0].as_py() for r in returns) / len(returns)


def far(returns):
    return -fit(returns)


def flat(returns):
    return 1.0
'''

RUN = ("--workers", "1", "--threads-per-worker", "1", "--no-progress", "--json")


def run(spec: Path) -> None:
    proc = tidegate("run", spec, *RUN, cwd=spec.parent, timeout=180)
    assert proc.returncode in (0, 4), proc.stderr


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5 x 3 grid, x=0.9 failing (3 failed params), three targets."""
    root = tmp_path_factory.mktemp("grid")
    (root / "model").mkdir()
    (root / "model" / "bowlgrid.py").write_text(MODEL)
    spec = write_spec(root / "job.yaml", {
        "job_id": "bowl-grid", "model": "bowlgrid:model", "code_paths": ["model"],
        "parameters": {"grid": {"x": [0.1, 0.3, 0.5, 0.7, 0.9], "y": [-0.2, 0.4, 1.0]}},
        "replicates": 2, "seed": 3,
        "targets": [{"name": "fit", "function": "bowlgrid:fit"},
                    {"name": "far", "function": "bowlgrid:far"},
                    {"name": "flat", "function": "bowlgrid:flat"}],
        "outputs": "none", "on_error": "continue", "output": "out"})
    run(spec)
    return root / "out"


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    spec = search_job(root, trials=8, sampler="random")
    run(spec)
    return root / "out"


def best(*args: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["best", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected(out: Path, target: str) -> list[dict[str, Any]]:
    """Ok params by the target's loss ascending, ties by param id, with their values."""
    params = {r["param_id"]: r for r in read_dataset(out / "params")}
    rows = [r for r in read_dataset(out / "targets" / target)
            if params[r["param_id"]]["status"] == "ok"]
    rows.sort(key=lambda r: (r["loss"], r["param_id"]))
    return [{"loss": r["loss"], "param_id": r["param_id"],
             "values": {k.removeprefix("param_"): v for k, v in params[r["param_id"]].items()
                        if k.startswith("param_") and k != "param_id"}} for r in rows]


def test_a_grid_ranked_by_its_first_target(grid: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The first target by default: the ten lowest losses ascending, their values, the
    failed params left out; the JSON list and the table say the same."""
    code, out, err = best(grid, "--json", capsys=capsys)
    assert code == 0, err
    ranked = json.loads(out)
    want = expected(grid, "fit")
    assert len(want) == 12  # 15 params, the 3 of x=0.9 failed
    assert [{k: r[k] for k in ("loss", "param_id", "values")} for r in ranked] == want[:10]
    assert [r["rank"] for r in ranked] == list(range(1, 11))
    assert "trial" not in ranked[0]  # a grid has no trials
    assert ranked[0]["values"] == {"x": 0.3, "y": -0.2}
    code, text, _ = best(grid, "--top", "3", capsys=capsys)
    assert code == 0
    head, header, *lines = text.splitlines()
    assert head == f"{grid}: 3 best of 12 params with a loss of target 'fit', lowest first"
    assert header.split() == ["rank", "loss", "param_id", "x", "y"]
    assert len(lines) == 3
    for i, (line, row) in enumerate(zip(lines, want, strict=False), start=1):
        assert line.split() == [str(i), f"{row['loss']:.6g}", row["param_id"],
                                f"{row['values']['x']:.6g}", f"{row['values']['y']:.6g}"]


def test_another_target_and_ties_broken_by_param_id(
        grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = best(grid, "--target", "far", "--top", "100", "--json", capsys=capsys)
    assert code == 0
    far = json.loads(out)
    assert [r["param_id"] for r in far] == [r["param_id"] for r in expected(grid, "far")]
    assert [r["param_id"] for r in far] == [r["param_id"] for r in expected(grid, "fit")][::-1]
    code, out, _ = best(grid, "--target", "flat", "--top", "5", "--json", capsys=capsys)
    flat = json.loads(out)
    assert {r["loss"] for r in flat} == {1.0}
    ids = [r["param_id"] for r in flat]
    assert ids == sorted(r["param_id"] for r in expected(grid, "flat"))[:5]


def test_a_search_ranked_by_its_objective_with_trial_numbers(
        search: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The objective by default; each row's trial number is the one the study holds
    for its param id."""
    code, out, err = best(search, "--json", capsys=capsys)
    assert code == 0, err
    ranked = json.loads(out)
    want = expected(search, "fit")
    assert [{k: r[k] for k in ("loss", "param_id", "values")} for r in ranked] == want
    numbers = {t.user_attrs["param_id"]: t.number for t in trials(search / "search.journal")}
    assert [r["trial"] for r in ranked] == [numbers[r["param_id"]] for r in ranked]
    assert sorted(r["trial"] for r in ranked) == list(range(len(want)))
    code, text, _ = best(search, "--top", "2", capsys=capsys)
    head, header, first, _ = text.splitlines()
    assert head.startswith(f"{search}: 2 best of {len(want)} trials")
    assert header.split() == ["rank", "loss", "param_id", "trial", "x", "y"]
    assert first.split()[:4] == ["1", f"{want[0]['loss']:.6g}", want[0]["param_id"],
                                 str(ranked[0]["trial"])]


def test_bad_input_exits_2_naming_what_is_wrong(
        grid: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases: list[tuple[list[str | Path], str]] = [
        ([tmp_path / "nope"], "OUTPUT_DIR: expected a job output directory, got"),
        ([tmp_path], "holds no manifest.json or _ledger.sqlite: not a tidegate output"),
        ([grid, "--target", "loss"],
         "--target: expected one of the job's targets ('fit', 'far', 'flat'), got 'loss'"),
        ([grid, "--top", "0"], "--top: expected a whole number >= 1, got 0"),
    ]
    for args, message in cases:
        code, out, err = best(*args, capsys=capsys)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err
    code, out, err = best(tmp_path, "--json", capsys=capsys)
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_an_output_with_no_loss_yet_exits_2(tmp_path: Path, grid: Path) -> None:
    """The manifest and ledger of a job that has committed nothing (a copy of the
    grid's, its datasets left behind): a one-line message, exit 2, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("manifest.json", "_ledger.sqlite"):
        (empty / name).write_bytes((grid / name).read_bytes())
    message = [f"tidegate: error: OUTPUT_DIR: no committed param of {empty} has a loss "
               "of target 'fit' yet (targets/fit is empty)"]
    proc: subprocess.CompletedProcess[str] = tidegate("best", empty)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == message
    (empty / "targets" / "fit").mkdir(parents=True)  # a dataset's directory, no part yet
    proc = tidegate("best", empty)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == message


def test_validate_counts_a_searchs_trials(tmp_path: Path) -> None:
    spec = search_job(tmp_path, trials=12, sampler="random")
    proc = tidegate("validate", spec, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "  trials   12 x 2 replicates, 1 targets\n" in proc.stdout
    assert "  search   random over x, y, objective fit\n" in proc.stdout
    proc = tidegate("validate", spec, "--json", cwd=tmp_path)
    info = json.loads(proc.stdout)
    assert info["search"] == {"trials": 12, "objective": "fit", "sampler": "random",
                              "space": ["x", "y"]}
