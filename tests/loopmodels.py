"""Models a modeller writes, breaks and fixes: the failure paths of the run loop's tests.
Importable as ``tests.loopmodels`` in this process, and copied beside a spec
(``loopmodels``) for real workers."""

from __future__ import annotations

import time
from typing import Any


def fails(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Raises for every param, with the param's value in its message."""
    raise ValueError(f"bad input {params['k']}")


def some_fail(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fails for odd k (two kinds of error), returns a table otherwise."""
    k = params["k"]
    if k % 4 == 1:
        raise ValueError(f"bad input {k}")
    if k % 4 == 3:
        raise KeyError(f"missing column at /data/run-{k}/x.csv")
    return {"data": {"x": [k, k + 1]}}


def returns_list(params: dict[str, Any], seed: int) -> Any:
    """Breaks the contract: a list, not a mapping of tables."""
    return [params["k"]]


def echoes_seed(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Returns its seed as a column, as models often do."""
    return {"data": {"seed": [seed, seed], "x": [params["k"], 2 * params["k"]]}}


def wrong_seed(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """A ``seed`` column that is not tidegate's seed."""
    return {"data": {"seed": [1, 2], "x": [params["k"], 0]}}


def hangs(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Sleeps ``sleep`` seconds (in steps, as a busy model would not return either)."""
    end = time.monotonic() + float(params.get("sleep", 0))
    while time.monotonic() < end:
        time.sleep(0.05)
    return {"data": {"x": [params["k"]]}}
