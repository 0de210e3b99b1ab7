"""The layout check at the start of a job: workers whose memory limits add up to more
than their host or cgroup holds."""

from __future__ import annotations

import logging

import pytest

from tidegate.cluster import WorkerInfo
from tidegate.limiter import check_layout

GiB = 2**30


def _worker(address: str, limit: int) -> WorkerInfo:
    return WorkerInfo(address, 1, limit, 0, 0, 0, "running")


def _info(host: str = "h1", memory: int = 16 * GiB, cgroup: str = "/pod",
          cgroup_limit: int | None = None) -> dict[str, object]:
    return {"hostname": host, "boot_id": "b-" + host, "host_memory": memory,
            "cgroup": cgroup, "cgroup_limit": cgroup_limit}


def test_limits_within_the_host_leave_the_budget_whole(caplog: pytest.LogCaptureFixture) -> None:
    workers = [_worker("a", 4 * GiB), _worker("b", 4 * GiB)]
    with caplog.at_level(logging.WARNING):
        assert check_layout({"a": _info(), "b": _info()}, workers) == 1.0
    assert not caplog.records


def test_a_cgroup_smaller_than_its_workers_limits_is_said_and_scales_the_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers of 4 GiB in a pod of 6 GiB: a cgroup OOM kill would take both."""
    workers = [_worker("a", 4 * GiB), _worker("b", 4 * GiB)]
    layout = {a: _info(cgroup_limit=6 * GiB) for a in ("a", "b")}
    with caplog.at_level(logging.WARNING):
        scale = check_layout(layout, workers)
    assert scale == pytest.approx(6 / 8)
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "memory_overcommitted"]
    text = record.getMessage()
    assert "8192 MiB" in text and "6144 MiB" in text and "2 workers" in text


def test_hosts_are_checked_apart(caplog: pytest.LogCaptureFixture) -> None:
    """Workers on two hosts of 8 GiB, 6 GiB each: only the host holding two is short."""
    workers = [_worker("a", 6 * GiB), _worker("b", 6 * GiB), _worker("c", 6 * GiB)]
    layout = {"a": _info("h1", 8 * GiB), "b": _info("h1", 8 * GiB), "c": _info("h2", 8 * GiB)}
    with caplog.at_level(logging.WARNING):
        assert check_layout(layout, workers) == pytest.approx(8 / 12)
    assert len([r for r in caplog.records if "host h1" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if "host h2" in r.getMessage()]


def test_unknown_layout_changes_nothing() -> None:
    assert check_layout({}, [_worker("a", 4 * GiB)]) == 1.0
    assert check_layout({"a": {"hostname": 3, "host_memory": "x"}}, [_worker("a", GiB)]) == 1.0
