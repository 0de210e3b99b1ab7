"""Regenerate observed_incidence.csv: one epidemic from sir.simulate at the "true"
parameters, with Poisson reporting noise on each day's count.

    python make_observed.py
"""

from __future__ import annotations

import csv

import numpy as np
from sir import OBSERVED_CSV, simulate

TRUE_PARAMS = {"beta": 0.3, "gamma": 0.1}
EPIDEMIC_SEED = 11
NOISE_SEED = 12


def observed_rows() -> list[tuple[int, int]]:
    """(day, new_cases) rows of the observed epidemic."""
    incidence = simulate(TRUE_PARAMS, EPIDEMIC_SEED)["incidence"]
    noisy = np.random.default_rng(NOISE_SEED).poisson(incidence["new_cases"])
    return [(int(d), int(c)) for d, c in zip(incidence["day"], noisy, strict=True)]


def main() -> None:
    with OBSERVED_CSV.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["day", "new_cases"])
        writer.writerows(observed_rows())
    print(f"wrote {OBSERVED_CSV}")


if __name__ == "__main__":
    main()
