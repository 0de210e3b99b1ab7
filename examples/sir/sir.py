"""A stochastic SIR epidemic (discrete-time chain binomial) and three targets that score
it against ``observed_incidence.csv``.

Each day every susceptible is infected with probability ``1 - exp(-beta * I / N)`` and
every infectious person recovers with probability ``1 - exp(-gamma)``; the two counts
are binomial draws from ``np.random.default_rng(seed)``, so a (params, seed) pair always
gives the same epidemic.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OBSERVED_CSV = Path(__file__).with_name("observed_incidence.csv")

DEFAULTS: dict[str, int] = {"population": 10_000, "initial_infected": 10, "days": 120}
RATES = ("beta", "gamma")
# Poisson deviance needs a positive mean: a day with no simulated case anywhere is
# scored as if half a case were expected, which keeps the loss finite and ordered.
MIN_MEAN_CASES = 0.5

# epidemic_loss: four summary statistics of an epidemic curve, each scaled by how far one
# observed epidemic strays from its parameters' mean (measured at beta=0.3, gamma=0.1
# over 300 seeds: the model's own spread, with the Poisson reporting noise of
# observed_incidence.csv on top). Dividing by them makes the loss a sum of squared
# z-scores, so no statistic outweighs the others by its units.
STAT_NAMES = ("final_size", "peak_height", "peak_day", "growth_rate")
STAT_SCALES = (100.0, 13.0, 2.5, 0.013)
SMOOTH_DAYS = 7  # the peak of a 7-day mean: a single day's count is too noisy a peak
# The growth rate is fitted where the rise is exponential: past the first few cases
# (whose timing is chance) and before susceptibles run short.
GROWTH_WINDOW = (0.02, 0.3)  # fractions of the smoothed peak


# --- the model -----------------------------------------------------------------------


def simulate(params: Mapping[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    """One replicate: daily incidence with S, I, R at the end of each day, and a summary."""
    beta, gamma, population, initial_infected, days = _read_params(params)
    rng = np.random.default_rng(seed)
    p_recover = -math.expm1(-gamma)
    s, i, r = population - initial_infected, initial_infected, 0
    state = np.zeros((days, 4), dtype=np.int64)  # new_cases, S, I, R
    for d in range(days):
        infections = int(rng.binomial(s, -math.expm1(-beta * i / population))) if i else 0
        recoveries = int(rng.binomial(i, p_recover)) if i else 0
        s, i, r = s - infections, i + infections - recoveries, r + recoveries
        state[d] = infections, s, i, r
    new_cases = state[:, 0]
    final_size = int(new_cases.sum())
    return {
        "incidence": {
            "day": np.arange(1, days + 1, dtype=np.int64),
            "new_cases": new_cases,
            "susceptible": state[:, 1],
            "infectious": state[:, 2],
            "recovered": state[:, 3],
        },
        "summary": {
            "peak_day": [int(np.argmax(new_cases)) + 1],
            "peak_cases": [int(new_cases.max())],
            "final_size": [final_size],
            "attack_rate": [final_size / (population - initial_infected)],
            "still_infectious": [i],
        },
    }


def _read_params(params: Mapping[str, Any]) -> tuple[float, float, int, int, int]:
    unknown = sorted(set(params) - set(RATES) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"sir: unknown params {unknown}; expected {list(RATES)} and optionally {list(DEFAULTS)}"
        )
    beta, gamma = (_rate(params, name) for name in RATES)
    population, initial_infected, days = (_count(params, name, DEFAULTS[name]) for name in DEFAULTS)
    if not 1 <= initial_infected <= population:
        raise ValueError(
            f"sir: param 'initial_infected' must be in [1, population={population}], "
            f"got {initial_infected}"
        )
    return beta, gamma, population, initial_infected, days


def _rate(params: Mapping[str, Any], name: str) -> float:
    if name not in params:
        raise ValueError(f"sir: param {name!r} is required")
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"sir: param {name!r} must be a number (got {value!r} that is a {type(value).__name__})"
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"sir: param {name!r} must be a positive number, got {value!r}")
    return float(value)


def _count(params: Mapping[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"sir: param {name!r} must be an int (got {value!r} that is a {type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"sir: param {name!r} must be >= 1, got {value}")
    return value


# --- the targets ---------------------------------------------------------------------


@functools.cache
def observed() -> tuple[np.ndarray, np.ndarray]:
    """(day, new_cases) from observed_incidence.csv, read once per process."""
    with OBSERVED_CSV.open(newline="") as f:
        rows = [(int(row["day"]), int(row["new_cases"])) for row in csv.DictReader(f)]
    days, cases = (np.array(column, dtype=np.int64) for column in zip(*rows, strict=True))
    days.flags.writeable = cases.flags.writeable = False
    return days, cases


def incidence_loss(returns: Sequence[Any]) -> dict[str, Any]:
    """Mean Poisson deviance per day of the observed incidence, given the mean simulated
    incidence across replicates."""
    days, obs = observed()
    mean = mean_incidence(returns, days)
    mu = np.maximum(mean, MIN_MEAN_CASES)
    # y * log(y / mu) is 0 when y == 0; log(1 / mu) * 0 keeps NumPy from warning.
    y_log = obs * np.log(np.where(obs > 0, obs, 1) / mu)
    deviance = 2.0 * float(np.mean(y_log - (obs - mu)))
    return {
        "loss": deviance,
        "diagnostics": {
            "rmse": float(np.sqrt(np.mean((mean - obs) ** 2))),
            "peak_day_sim": int(days[np.argmax(mean)]),
            "peak_day_obs": int(days[np.argmax(obs)]),
            "total_cases_sim": float(mean.sum()),
            "total_cases_obs": int(obs.sum()),
            "n_replicates": len(returns),
        },
    }


def peak_loss(returns: Sequence[Any]) -> dict[str, Any]:
    """Squared error between the replicates' mean peak day and the observed peak day."""
    if not returns:
        raise ValueError("sir: no replicates to score")
    days, obs = observed()
    peak_obs = int(days[np.argmax(obs)])
    peaks = [r.table("summary").column("peak_day")[0].as_py() for r in returns]
    peak_sim = float(np.mean(peaks))
    return {
        "loss": (peak_sim - peak_obs) ** 2,
        "diagnostics": {
            "peak_day_sim": peak_sim,
            "peak_day_obs": peak_obs,
            "peak_day_sd": float(np.std(peaks)),
            "n_replicates": len(returns),
        },
    }


def epidemic_loss(returns: Sequence[Any]) -> dict[str, Any]:
    """Sum of squared z-scores of the replicates' mean summary statistics against the
    observed ones: final size, peak height (of the 7-day mean), peak day and early growth
    rate, each divided by its scale in STAT_SCALES.

    Why not the whole curve: the day-by-day deviance of incidence_loss is dominated by
    when the epidemic happens to take off (the first few cases' chance timing moves the
    peak by +-2.5 days), and it is flat along the line beta - gamma = 0.2 (the early
    growth rate), so a handful of replicates cannot tell (0.28, 0.08) from (0.30, 0.10).
    The growth rate pins beta - gamma; final size and peak height pin R0 = beta / gamma;
    and none of the four moves much with take-off timing.
    """
    if not returns:
        raise ValueError("sir: no replicates to score")
    days = observed()[0]
    sim = np.mean([epidemic_stats(replicate_cases(ret, days)) for ret in returns], axis=0)
    want = observed_stats()
    z = (sim - want) / np.array(STAT_SCALES)
    return {
        "loss": float(np.sum(z**2)),
        "diagnostics": {
            **{f"{name}_sim": float(v) for name, v in zip(STAT_NAMES, sim, strict=True)},
            **{f"{name}_obs": float(v) for name, v in zip(STAT_NAMES, want, strict=True)},
            "n_replicates": len(returns),
        },
    }


@functools.cache
def observed_stats() -> np.ndarray:
    """epidemic_stats of the observed incidence, computed once per process."""
    stats = epidemic_stats(observed()[1])
    stats.flags.writeable = False
    return stats


def epidemic_stats(cases: np.ndarray) -> np.ndarray:
    """(final size, peak of the 7-day mean, its day (1-based), early growth rate per day)
    of one daily incidence series."""
    cases = np.asarray(cases, dtype=np.float64)
    smooth = np.convolve(cases, np.ones(SMOOTH_DAYS) / SMOOTH_DAYS, mode="same")
    peak = int(np.argmax(smooth))
    return np.array([cases.sum(), smooth[peak], peak + 1, _growth_rate(smooth[: peak + 1])])


def _growth_rate(rise: np.ndarray) -> float:
    """The log-linear slope of the smoothed incidence on its way up to the peak, fitted
    between GROWTH_WINDOW's fractions of the peak; 0 for a curve that never rises
    through them (an epidemic that dies out)."""
    low, high = GROWTH_WINDOW
    top = rise[-1] if len(rise) else 0.0
    inside = (rise > 0) & (rise >= low * top) & (rise <= high * top)
    if inside.sum() < 3:
        return 0.0
    t = np.flatnonzero(inside)
    return float(np.polyfit(t, np.log(rise[t]), 1)[0])


def mean_incidence(returns: Sequence[Any], days: np.ndarray) -> np.ndarray:
    """The replicates' mean new_cases on each of ``days``."""
    if not returns:
        raise ValueError("sir: no replicates to score")
    total = np.zeros(len(days), dtype=np.float64)
    for ret in returns:
        total += replicate_cases(ret, days)
    return total / len(returns)


def replicate_cases(ret: Any, days: np.ndarray) -> np.ndarray:
    """One replicate's new_cases on each of ``days``; an error if it does not simulate
    them all."""
    table = ret.table("incidence")
    sim_days = table.column("day").to_numpy()
    pos = np.searchsorted(sim_days, days)
    covered = pos < len(sim_days)
    if not (covered.all() and (sim_days[pos] == days).all()):
        raise ValueError(
            f"sir: replicate {ret.replicate} simulates days {sim_days.min()}.."
            f"{sim_days.max()}; {OBSERVED_CSV.name} needs days {days[0]}..{days[-1]}"
        )
    return np.asarray(table.column("new_cases").to_numpy()[pos], dtype=np.float64)
