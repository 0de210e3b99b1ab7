"""The SIR example: its model, its targets, its observed data and its job spec."""

from __future__ import annotations

import csv
import importlib
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tidegate.simreturn import SimReturn, run_sim, run_target

np = pytest.importorskip("numpy")

SIR_DIR = Path(__file__).resolve().parents[2] / "examples" / "sir"
TRUE = {"beta": 0.3, "gamma": 0.1}
FAR = {"beta": 0.5, "gamma": 0.1}


@pytest.fixture(scope="module")
def sir() -> Iterator[ModuleType]:
    """The example's sir module, importable as ``sir:...`` the way tidegate imports it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SIR_DIR))
        yield importlib.import_module("sir")


def replicates(params: dict[str, float], seeds: list[int]) -> list[SimReturn]:
    returns = [run_sim("sir:simulate", params, "p", r, seed) for r, seed in enumerate(seeds)]
    assert all(r.ok for r in returns), [str(r.error) for r in returns]
    return returns


# --- the model -------------------------------------------------------------------------


def test_same_seed_gives_same_epidemic(sir: ModuleType) -> None:
    """Two runs with the same params and seed return identical tables."""
    a, b = replicates(TRUE, [7, 7])
    for name in ("incidence", "summary"):
        assert a.table(name).equals(b.table(name))


def test_different_seeds_give_different_epidemics(sir: ModuleType) -> None:
    """Runs with different seeds differ in their daily incidence."""
    a, b = replicates(TRUE, [7, 8])
    assert not a.table("incidence").equals(b.table("incidence"))


def test_population_is_conserved_every_day(sir: ModuleType) -> None:
    """S + I + R equals the population on every day, and incidence is never negative."""
    out = sir.simulate({**TRUE, "population": 5000, "initial_infected": 3}, 11)["incidence"]
    total = out["susceptible"] + out["infectious"] + out["recovered"]
    assert (total == 5000).all()
    assert (out["new_cases"] >= 0).all()
    # S only falls, by exactly the day's new cases.
    assert (np.diff(np.concatenate([[4997], out["susceptible"]])) == -out["new_cases"]).all()


def test_summary_agrees_with_incidence(sir: ModuleType) -> None:
    """The summary's peak and final size are those of the incidence table."""
    out = sir.simulate(TRUE, 3)
    cases, summary = out["incidence"]["new_cases"], out["summary"]
    assert summary["peak_cases"] == [cases.max()]
    assert summary["peak_day"] == [int(np.argmax(cases)) + 1]
    assert summary["final_size"] == [cases.sum()]
    assert summary["attack_rate"][0] == pytest.approx(cases.sum() / (10_000 - 10))


def test_outputs_convert_and_avoid_reserved_columns(sir: ModuleType) -> None:
    """Both outputs become Arrow tables with the documented columns and row counts."""
    (ret,) = replicates({**TRUE, "days": 30}, [1])
    assert ret.table("incidence").column_names == [
        "day", "new_cases", "susceptible", "infectious", "recovered",
    ]  # fmt: skip
    assert ret.table("incidence").num_rows == 30
    assert ret.table("summary").num_rows == 1


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"gamma": 0.1}, ValueError, "'beta' is required"),
        ({"beta": "0.3", "gamma": 0.1}, TypeError, "'beta' must be a number"),
        ({"beta": -0.3, "gamma": 0.1}, ValueError, "'beta' must be a positive"),
        ({**TRUE, "days": 10.5}, TypeError, "'days' must be an int"),
        ({**TRUE, "initial_infected": 0}, ValueError, "'initial_infected' must be >= 1"),
        ({**TRUE, "population": 5, "initial_infected": 6}, ValueError, "initial_infected"),
        ({**TRUE, "gama": 0.1}, ValueError, r"unknown params \['gama'\]"),
    ],
)
def test_bad_params_raise_errors_naming_them(
    sir: ModuleType, params: dict[str, object], error: type[Exception], match: str
) -> None:
    """A missing, mistyped, out-of-range or unknown param raises an error naming it."""
    with pytest.raises(error, match=match):
        sir.simulate(params, 0)


def test_one_replicate_is_fast(sir: ModuleType) -> None:
    """A replicate takes well under 50 ms on average (a loose bound for busy machines)."""
    start = time.perf_counter()
    for seed in range(20):
        sir.simulate(TRUE, seed)
    assert (time.perf_counter() - start) / 20 < 0.05


# --- the targets -----------------------------------------------------------------------


def test_incidence_loss_is_finite_with_diagnostics(sir: ModuleType) -> None:
    """incidence_loss returns a finite loss and the documented diagnostics."""
    result = run_target("sir:incidence_loss", "incidence", "p", *replicates(TRUE, [1, 2, 3]))
    assert result.error is None, result.error
    assert math.isfinite(result.loss)
    assert {"rmse", "peak_day_sim", "peak_day_obs", "n_replicates"} <= set(result.diagnostics)
    assert result.diagnostics["n_replicates"] == 3


def test_incidence_loss_is_finite_when_the_epidemic_dies_out(sir: ModuleType) -> None:
    """With R0 < 1 (almost no simulated cases) the loss is still finite, and large."""
    result = run_target("sir:incidence_loss", "incidence", "p", *replicates(
        {"beta": 0.05, "gamma": 0.2}, [1, 2, 3]
    ))  # fmt: skip
    assert result.error is None, result.error
    assert math.isfinite(result.loss) and result.loss > 100


@pytest.mark.parametrize("target", ["incidence_loss", "peak_loss", "epidemic_loss"])
def test_loss_is_lower_at_true_params_than_far_away(sir: ModuleType, target: str) -> None:
    """Averaged over 5 seed sets, each loss is lower at the true params than far away."""
    fn = getattr(sir, target)

    def mean_loss(params: dict[str, float]) -> float:
        losses = [fn(replicates(params, [s, s + 1, s + 2]))["loss"] for s in range(0, 15, 3)]
        return sum(losses) / len(losses)

    assert mean_loss(TRUE) < mean_loss(FAR)


def test_peak_loss_is_squared_peak_day_error(sir: ModuleType) -> None:
    """peak_loss is (mean simulated peak day - observed peak day) squared."""
    returns = replicates(TRUE, [4, 5])
    result = sir.peak_loss(returns)
    d = result["diagnostics"]
    peaks = [r.table("summary").column("peak_day")[0].as_py() for r in returns]
    assert d["peak_day_sim"] == sum(peaks) / 2
    assert result["loss"] == pytest.approx((d["peak_day_sim"] - d["peak_day_obs"]) ** 2)


@pytest.mark.parametrize("target", ["incidence_loss", "epidemic_loss"])
def test_targets_reject_too_short_simulations(sir: ModuleType, target: str) -> None:
    """A run shorter than the observed series is an error that says which days are missing."""
    with pytest.raises(ValueError, match=r"simulates days 1\.\.30; .* needs days 1\.\.120"):
        getattr(sir, target)(replicates({**TRUE, "days": 30}, [1]))


def test_epidemic_stats_of_a_known_curve(sir: ModuleType) -> None:
    """A curve growing 10% a day for 60 days then falling: its final size is its sum, its
    peak the top of its 7-day mean (day 60 or 61), and its growth rate log(1.1) a day
    (the fit starts 41 days before the peak, clear of the zero-padded first days)."""
    rise = 0.01 * 1.1 ** np.arange(60)
    cases = np.concatenate([rise, rise[::-1]])
    final, height, day, growth = sir.epidemic_stats(cases)
    assert final == pytest.approx(cases.sum())
    smooth = np.convolve(cases, np.ones(7) / 7, mode="same")
    assert (day, height) == (int(np.argmax(smooth)) + 1, pytest.approx(smooth.max()))
    assert day in (60, 61)
    assert growth == pytest.approx(math.log(1.1), rel=1e-3)


def test_epidemic_stats_of_a_curve_that_never_rises(sir: ModuleType) -> None:
    """No cases at all: zero final size, peak and growth rate (finite, no warning)."""
    with np.errstate(all="raise"):
        final, height, _, growth = sir.epidemic_stats(np.zeros(120))
    assert (final, height, growth) == (0.0, 0.0, 0.0)


def test_epidemic_loss_is_the_sum_of_squared_z_scores(sir: ModuleType) -> None:
    """epidemic_loss averages the replicates' statistics, divides each one's distance
    from the observed by its scale, and sums the squares; diagnostics name them all."""
    returns = replicates(TRUE, [1, 2, 3])
    _, obs = sir.observed()
    sims = [sir.epidemic_stats(r.table("incidence").column("new_cases").to_numpy())
            for r in returns]
    z = (np.mean(sims, axis=0) - sir.epidemic_stats(obs)) / np.array(sir.STAT_SCALES)
    result = sir.epidemic_loss(returns)
    assert result["loss"] == pytest.approx(float(np.sum(z**2)))
    d = result["diagnostics"]
    assert d["n_replicates"] == 3
    assert d["final_size_obs"] == obs.sum()
    for name in sir.STAT_NAMES:
        assert math.isfinite(d[f"{name}_sim"]) and math.isfinite(d[f"{name}_obs"])


def test_epidemic_loss_is_finite_and_large_when_the_epidemic_dies_out(
    sir: ModuleType,
) -> None:
    """With R0 < 1 the loss is finite and far above its value at the truth."""
    dead = run_target("sir:epidemic_loss", "epidemic", "p",
                      *replicates({"beta": 0.05, "gamma": 0.2}, [1, 2, 3]))
    assert dead.error is None, dead.error
    assert math.isfinite(dead.loss) and dead.loss > 1000


def test_epidemic_loss_tells_points_along_the_growth_ridge_apart(sir: ModuleType) -> None:
    """beta - gamma = 0.2 at both points (the same early growth): with 20 replicates
    epidemic_loss ranks the truth well below (0.27, 0.07), 10% off in beta and 30% in
    gamma, while incidence_loss's day-by-day deviance does not (with these seeds it even
    prefers the wrong point)."""
    seeds = list(range(100, 120))
    truth, ridge = replicates(TRUE, seeds), replicates({"beta": 0.27, "gamma": 0.07}, seeds)
    epidemic = [sir.epidemic_loss(r)["loss"] for r in (truth, ridge)]
    incidence = [sir.incidence_loss(r)["loss"] for r in (truth, ridge)]
    assert 3 * epidemic[0] < epidemic[1]
    assert incidence[1] / incidence[0] < epidemic[1] / epidemic[0]


# --- the observed data and the job spec ------------------------------------------------


def test_observed_csv_is_what_make_observed_generates(sir: ModuleType) -> None:
    """The committed observed_incidence.csv is exactly what make_observed.py writes."""
    make_observed = importlib.import_module("make_observed")
    with (SIR_DIR / "observed_incidence.csv").open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["day", "new_cases"]
        rows = [(int(day), int(cases)) for day, cases in reader]
    assert rows == make_observed.observed_rows()


def test_job_spec_sweeps_a_100_point_grid_around_the_truth(sir: ModuleType) -> None:
    """job.yaml has the spec's shape, >= 100 params including the true ones, and targets
    that name functions of the sir module."""
    spec = yaml.safe_load((SIR_DIR / "job.yaml").read_text())
    assert spec["model"] == "sir:simulate"
    grid = spec["parameters"]["grid"]
    points = list(itertools.product(grid["beta"], grid["gamma"]))
    assert len(set(points)) >= 100
    assert (TRUE["beta"], TRUE["gamma"]) in points
    for target in spec["targets"]:
        module, _, name = target["function"].partition(":")
        assert module == "sir" and callable(getattr(sir, name))
