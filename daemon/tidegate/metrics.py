"""Every Prometheus metric tidegate exports, defined once on an injectable registry.

The names are a contract: the shipped Grafana dashboard and alert rules use them. Label
values stay bounded (kinds, causes, outcomes, states; never a job or param id).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

from tidegate import __version__
from tidegate.losses import Cause

# 1 KiB .. 4 GiB in powers of 4: a SimReturn ranges from a summary row to a big table.
_BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(12))
_FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """tidegate's metrics on one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batch_size = Gauge(
            "tidegate_batch_size", "B: the most params allowed in flight now", registry=r
        )
        self.batch_size_target = Gauge(
            "tidegate_batch_size_target",
            "The controller's target for B: min of the memory and useful ceilings",
            registry=r,
        )
        self.batch_size_ceiling = Gauge(
            "tidegate_batch_size_ceiling",
            "Ceilings behind the target (memory: what fits the budget; useful: what keeps "
            "every thread busy); absent while unknown",
            ["kind"], registry=r,
        )
        self.inflight_params = Gauge(
            "tidegate_inflight_params", "Params admitted and not yet written", registry=r
        )
        self.inflight_tasks = Gauge(
            "tidegate_inflight_tasks", "Tasks of the params in flight", ["kind"], registry=r
        )
        self.worker_restarts = Counter(
            "tidegate_worker_restarts", "Workers lost, by classified cause", ["cause"],
            registry=r,
        )
        self.oom_events = Counter(
            "tidegate_oom_events",
            "Workers lost to memory: kernel OOM kills and the nanny's memory terminations",
            registry=r,
        )
        self.simreturn_bytes = Histogram(
            "tidegate_simreturn_bytes", "Size of each SimReturn's outputs (Arrow IPC bytes)",
            buckets=_BYTES_BUCKETS, registry=r,
        )
        self.cluster_memory = Gauge(
            "tidegate_cluster_memory_bytes",
            "Cluster memory summed over workers: limit, used (RSS), managed (results held), "
            "and the controller's budget for results",
            ["kind"], registry=r,
        )
        self.decisions = Counter(
            "tidegate_controller_decisions", "Controller decisions by action", ["action"],
            registry=r,
        )
        self.params = Counter(
            "tidegate_params", "Params written, by outcome", ["outcome"], registry=r
        )
        self.tasks = Counter(
            "tidegate_tasks", "Tasks completed, by kind and outcome", ["kind", "outcome"],
            registry=r,
        )
        self.job_params = Gauge(
            "tidegate_job_params", "The running job's params: total and done", ["kind"],
            registry=r,
        )
        self.jobs = Gauge("tidegate_jobs", "Jobs by state", ["state"], registry=r)
        self.parts_written = Counter(
            "tidegate_parts_written", "Parts committed to the ledger", registry=r
        )
        self.parquet_bytes_written = Counter(
            "tidegate_parquet_bytes_written", "Bytes of Parquet files committed", registry=r
        )
        self.flush_seconds = Histogram(
            "tidegate_flush_seconds", "Time to write, fsync and commit one part",
            buckets=_FLUSH_BUCKETS, registry=r,
        )
        self.scheduler_connected = Gauge(
            "tidegate_scheduler_connected", "1 while the Dask scheduler is reachable",
            registry=r,
        )
        self.build_info = Info("tidegate_build", "tidegate's version", registry=r)
        self.build_info.info({"version": __version__})
        for cause in Cause:
            self.worker_restarts.labels(cause=cause.value)
        for outcome in ("ok", "failed"):
            self.params.labels(outcome=outcome)
            for kind in ("sim", "agg"):
                self.tasks.labels(kind=kind, outcome=outcome)
        if process:
            ProcessCollector(registry=r)

    def exposition(self) -> bytes:
        """The text format a Prometheus server scrapes."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics on a background thread (for `tidegate run --metrics-port`)."""
        start_http_server(port, addr=addr, registry=self.registry)
