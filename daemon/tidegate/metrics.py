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


BLOCK_REASONS = ("memory", "threads", "pinned", "draining", "solo")

# Every metric's name and help text, the contract the dashboard and alert rules read.
_HELP = {
    "tidegate_batch_size": "B: the most params allowed in flight now",
    "tidegate_batch_size_target": (
        "The controller's target for B: min of the memory and useful ceilings"
    ),
    "tidegate_batch_size_ceiling": (
        "Ceilings behind the target (memory: what fits the budget; useful: what keeps "
        "every thread busy); absent while unknown"
    ),
    "tidegate_inflight_params": "Params admitted and not yet written",
    "tidegate_inflight_tasks": "Tasks of the params in flight",
    "tidegate_worker_restarts": "Workers lost, by classified cause",
    "tidegate_oom_events": (
        "Workers lost to memory: kernel OOM kills and the nanny's memory terminations"
    ),
    "tidegate_child_kills": (
        "Child process trees of a sim tidegate killed: the worker's whole tree passed the "
        "terminate fraction of its limit (also counted in tidegate_oom_events)"
    ),
    "tidegate_admission_blocked_seconds": (
        "Seconds admission was held back, by reason: memory (pressure), threads (window "
        "full at B), pinned (full at a pinned B), draining, solo (a suspect waits to run alone)"
    ),
    "tidegate_sim_request_bytes": (
        "Bytes of the tidegate-memory resource each sim requests (0: per-worker admission off)"
    ),
    "tidegate_slots": "Sims all workers may run at once under the sim request",
    "tidegate_worker_slots": (
        "Sims one worker may run at once under the sim request, by Dask worker name"
    ),
    "tidegate_simreturn_bytes": "Size of each SimReturn's outputs (Arrow IPC bytes)",
    "tidegate_cluster_memory_bytes": (
        "Cluster memory summed over workers: limit, used (RSS), managed (results held), "
        "and the controller's budget for results"
    ),
    "tidegate_controller_decisions": "Controller decisions by action",
    "tidegate_params": "Params written, by outcome",
    "tidegate_tasks": "Tasks completed, by kind and outcome",
    "tidegate_job_params": "The running job's params: total and done",
    "tidegate_jobs": "Jobs by state",
    "tidegate_parts_written": "Parts committed to the ledger",
    "tidegate_parquet_bytes_written": "Bytes of Parquet files committed",
    "tidegate_flush_seconds": "Time to write, fsync and commit one part",
    "tidegate_scheduler_connected": "1 while the Dask scheduler is reachable",
    "tidegate_search_best_loss": (
        "The running search's best objective loss so far (absent until a trial is told)"
    ),
    "tidegate_search_trials": (
        "The running search's trials: budget (parameters.search.trials), told (completed "
        "or failed, each once its part is committed) and failed"
    ),
    "tidegate_build": "tidegate's version",
}


class Metrics:
    """tidegate's metrics on one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.batch_size = self._gauge("tidegate_batch_size")
        self.batch_size_target = self._gauge("tidegate_batch_size_target")
        self.batch_size_ceiling = self._gauge("tidegate_batch_size_ceiling", "kind")
        self.inflight_params = self._gauge("tidegate_inflight_params")
        self.inflight_tasks = self._gauge("tidegate_inflight_tasks", "kind")
        self.worker_restarts = self._counter("tidegate_worker_restarts", "cause")
        self.oom_events = self._counter("tidegate_oom_events")
        self.child_kills = self._counter("tidegate_child_kills")
        self.admission_blocked = self._counter("tidegate_admission_blocked_seconds", "reason")
        self.sim_request = self._gauge("tidegate_sim_request_bytes")
        self.slots_total = self._gauge("tidegate_slots")
        self.worker_slots = self._gauge("tidegate_worker_slots", "worker")
        self.simreturn_bytes = self._histogram("tidegate_simreturn_bytes", _BYTES_BUCKETS)
        self.cluster_memory = self._gauge("tidegate_cluster_memory_bytes", "kind")
        self.decisions = self._counter("tidegate_controller_decisions", "action")
        self.params = self._counter("tidegate_params", "outcome")
        self.tasks = self._counter("tidegate_tasks", "kind", "outcome")
        self.job_params = self._gauge("tidegate_job_params", "kind")
        self.jobs = self._gauge("tidegate_jobs", "state")
        self.parts_written = self._counter("tidegate_parts_written")
        self.parquet_bytes_written = self._counter("tidegate_parquet_bytes_written")
        self.flush_seconds = self._histogram("tidegate_flush_seconds", _FLUSH_BUCKETS)
        self.scheduler_connected = self._gauge("tidegate_scheduler_connected")
        self.search_best_loss = self._gauge("tidegate_search_best_loss")
        self.search_trials = self._gauge("tidegate_search_trials", "kind")
        self.build_info = Info("tidegate_build", _HELP["tidegate_build"], registry=self.registry)
        self.build_info.info({"version": __version__})
        for cause in Cause:
            self.worker_restarts.labels(cause=cause.value)
        for reason in BLOCK_REASONS:
            self.admission_blocked.labels(reason=reason)
        for outcome in ("ok", "failed"):
            self.params.labels(outcome=outcome)
            for kind in ("sim", "agg"):
                self.tasks.labels(kind=kind, outcome=outcome)
        if process:
            ProcessCollector(registry=self.registry)

    def _gauge(self, name: str, *labels: str) -> Gauge:
        return Gauge(name, _HELP[name], labels, registry=self.registry)

    def _counter(self, name: str, *labels: str) -> Counter:
        return Counter(name, _HELP[name], labels, registry=self.registry)

    def _histogram(self, name: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, _HELP[name], buckets=buckets, registry=self.registry)

    def exposition(self) -> bytes:
        """The text format a Prometheus server scrapes."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve /metrics on a background thread (for `tidegate run --metrics-port`)."""
        start_http_server(port, addr=addr, registry=self.registry)
