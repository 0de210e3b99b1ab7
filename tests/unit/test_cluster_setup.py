"""Cluster's setup calls when the workers die under them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from distributed.comm.core import CommClosedError

from tidegate.cluster import Cluster, WorkersLost


class _Client:
    """What Cluster.add_code_paths touches of a distributed Client, failing as Dask does
    when a worker dies during a plugin's setup."""

    loop: Any = None

    async def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}  # each worker's switch to the job's code: nothing to restart

    async def register_plugin(self, plugin: Any, name: str) -> None:
        raise CommClosedError("in <TLS (closed) ConnectionPool.plugin_add>: Stream is closed")


def test_workers_dying_during_plugin_setup_is_workers_lost(tmp_path: Any) -> None:
    """Raised as WorkersLost, which `tidegate run` answers by restarting its embedded
    cluster (it was a traceback and exit 1 after a restart whose workers died at once)."""
    cluster = Cluster.__new__(Cluster)
    cluster.client = _Client()  # type: ignore[assignment]
    cluster._registered = set()
    cluster._code, cluster._planned, cluster._watch = None, [], None
    with pytest.raises(WorkersLost, match="went away"):
        asyncio.run(cluster.add_code_paths([str(tmp_path)]))
