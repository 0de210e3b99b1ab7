"""`validate --try` / `run --limit` of a search: points drawn from its space, no study."""

from __future__ import annotations

from tidegate.spec import SearchSpec
from tidegate.trial import random_points


def test_a_search_trial_draws_points_of_its_space_with_distinct_ids() -> None:
    search = SearchSpec.model_validate({
        "space": {"beta": {"low": 0.05, "high": 0.6, "log": True},
                  "k": {"low": 1, "high": 3, "type": "int"},
                  "mode": {"choices": ["a", "b"]}},
        "objective": "loss", "trials": 50, "seed": 3})
    points = random_points(search, ["beta", "k", "mode"], 40, seed=0)
    assert len(points) == 40
    assert len({p.param_id for p in points}) == 40  # repeats of (k, mode) never collide
    for p in points:
        assert 0.05 <= p.values["beta"] <= 0.6
        assert type(p.values["k"]) is int and 1 <= p.values["k"] <= 3
        assert p.values["mode"] in ("a", "b")
    # Drawn from the search's seed: the same points again.
    again = random_points(search, ["beta", "k", "mode"], 40, seed=0)
    assert [p.values for p in again] == [p.values for p in points]
