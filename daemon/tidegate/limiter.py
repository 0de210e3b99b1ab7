"""The run loop's side of the controller (the Limiter to controller.py's Limit): turns
what the loop sees into observations, and holds the decision in force.

No I/O and no clock of its own: the loop hands in worker snapshots, measured results,
memory kills, its own pass times and the time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidegate.cluster import WorkerInfo
from tidegate.controller import Controller, ControllerConfig, Decision, Observation
from tidegate.fusion import fuse_factor, fused_request, pack_factor, task_seconds
from tidegate.outcome import Measured

log = logging.getLogger(__name__)
_MiB = 2**20


SEEN_LIMITS = 1024  # the workers whose memory limit a loss may need, newest kept


@dataclass(slots=True)
class Limiter:
    controller: Controller
    replicates: int
    targets: int
    decision: Decision | None = None
    limits: dict[str, int] = field(default_factory=dict)  # worker address -> memory limit
    # Every limit seen, kept when workers leave: a poll taken while the killed worker was
    # gone and its replacement not yet reporting left no limit to name (seen under load).
    seen_limits: dict[str, int] = field(default_factory=dict)
    capacities: dict[str, int] = field(default_factory=dict)  # -> its memory resource
    threads: dict[str, int] = field(default_factory=dict)  # -> its threads
    # Below 1 when the workers' limits add up to more than their host or cgroup holds.
    memory_scale: float = 1.0
    # The first result sizes end the slow start at once, not at the next poll.
    sizes_arrived: bool = False
    rtt: float = 0.001  # a scheduler round trip, measured by every poll
    fuse: bool = True  # batch.fuse: several short replicates of a param in one task
    pass_seconds: float = 0.0  # one pass of the loop: collect, flush, poll, refill

    @classmethod
    def of(cls, config: ControllerConfig, replicates: int, targets: int) -> Limiter:
        return cls(Controller(config), replicates, targets)

    @property
    def config(self) -> ControllerConfig:
        return self.controller.config

    @property
    def admit(self) -> bool:
        return self.decision is None or self.decision.admit

    def decide(
        self, workers: Sequence[WorkerInfo], *, inflight: int, pending: int, now: float
    ) -> tuple[Decision, bool]:
        """A decision from a fresh snapshot, and whether every worker was settled in it
        (calm, or back at its idle memory: WorkerMemory.settled)."""
        self.limits = {w.address: w.memory_limit for w in workers}
        self.seen_limits.update((a, m) for a, m in self.limits.items() if m > 0)
        while len(self.seen_limits) > SEEN_LIMITS:  # workers come and go under new addresses
            del self.seen_limits[next(iter(self.seen_limits))]
        self.capacities = {w.address: w.capacity for w in workers if w.capacity > 0}
        self.threads = {w.address: w.nthreads for w in workers}
        obs = Observation(
            now=now, workers=tuple(w.memory() for w in workers), inflight=inflight,
            pending=pending, replicates=self.replicates, targets=self.targets,
            memory_scale=self.memory_scale, fuse=self.replicates_per_task(),
            pack=self.params_per_task(),
        )
        self.decision = self.controller.decide(obs)
        calm = all(w.settled(self.config.low_water) for w in obs.workers)
        return self.decision, calm

    def request(self, *, solo: bool) -> int:
        """Bytes of the memory resource each sim of a param requests: a suspect claims
        the largest worker's whole capacity (nothing else runs beside it there, and Dask
        may place it on no smaller worker); others, the controller's sim request."""
        if solo:
            return max(self.capacities.values(), default=0)
        return self.decision.sim_request if self.decision is not None else 0

    def replicates_per_task(self) -> int:
        """k, the replicates one task of a fresh param runs now (tidegate.fusion), from
        the latest measurements: 1 while nothing is measured, with batch.fuse false, and
        where sims are long enough to pay for their own task."""
        if not self.fuse or self.replicates <= 1:
            return 1
        run, out, work = self.controller.sim_profile()
        return fuse_factor(run, self.replicates, task_s=self.task_seconds(), out_bytes=out,
                           work_bytes=work, share_bytes=self._thread_share())

    def task_seconds(self) -> float:
        """How long a fused task should last (tidegate.fusion.task_seconds), from the
        round trip the loop measures."""
        return task_seconds(self.controller.round_trip())

    def params_per_task(self) -> int:
        """g, the params one task runs now (tidegate.fusion.pack_factor): more than 1 only
        where a whole param's sims together are still short against a task's cost."""
        if not self.fuse:
            return 1
        run, out, work = self.controller.sim_profile()
        return pack_factor(run, self.replicates, self.replicates_per_task(),
                           task_s=self.task_seconds(), out_bytes=out, work_bytes=work,
                           share_bytes=self._thread_share())

    def task_request(self, request: int, k: int) -> int:
        """The memory resource a task of k replicates requests (its outputs count)."""
        _, out, _ = self.controller.sim_profile()
        fraction = self.config.memory_fraction * self.memory_scale
        return fused_request(request, k, out, fraction,
                             max(self.capacities.values(), default=0))

    def _thread_share(self) -> int:
        """The memory one thread of the smallest worker may use for a sim's working
        memory and outputs (0 unknown)."""
        fraction = self.config.memory_fraction * self.memory_scale
        sizes = self.capacities or {a: m for a, m in self.limits.items() if m > 0}
        shares = [int(size * fraction) // max(1, self.threads.get(a, 1))
                  for a, size in sizes.items()]
        return min(shares, default=0)

    def ran_alone(self, worker: str, limit: int) -> bool:
        """A sim on ``worker`` had it to itself (one thread), and no worker is larger:
        a need it met there is more than any worker holds."""
        largest = max(self.capacities.values(), default=0)
        return self.threads.get(worker) == 1 and limit >= largest > 0

    def decide_now(self) -> bool:
        """The first result sizes just arrived: decide at once (once), not at the poll."""
        arrived, self.sizes_arrived = self.sizes_arrived, False
        return arrived

    def loop_pass(self, seconds: float) -> None:
        self.pass_seconds = seconds

    def round_trip(self, seconds: float) -> None:
        self.rtt = seconds

    def gathered(self) -> None:
        """A batch of completed params was gathered: observe the round trip a refill
        cannot hide. That is the completion reaching tidegate, a pass of the loop and the
        replacement reaching a worker (about two scheduler round trips besides the pass);
        not a param's time in flight, which includes queueing, grows with B and would
        feed back into an ever larger useful ceiling (seen: B 2 -> 10,000 on trivial
        tasks)."""
        self.controller.observe_latency(self.pass_seconds + 2 * self.rtt)

    def collected(self, m: Measured) -> None:
        """A param's results: its replicates' sizes, run times and working memory."""
        c = self.controller
        self.sizes_arrived |= bool(m.replicates) and not c.sample_counts["sim_bytes"]
        for nbytes, _ in m.targets:
            c.observe_agg(nbytes)
        for rep in m.replicates:
            c.observe_sim(rep.nbytes, rep.run_seconds, rep.rss_delta_bytes)

    def memory_killed(self, worker: str, now: float) -> tuple[Decision, int]:
        """Back off after a worker was killed for memory; also returns its memory limit
        (a worker the nanny restarted since the last poll is not known yet: its
        siblings' limit is the best guess)."""
        limit = (self.limits.get(worker) or self.seen_limits.get(worker)
                 or max(self.limits.values(), default=0)
                 or max(self.seen_limits.values(), default=0))
        self.decision = self.controller.observe_oom(now)
        return self.decision, limit


def check_layout(layout: Mapping[str, Mapping[str, Any]], workers: Sequence[WorkerInfo]) -> float:
    """Warn once when the memory limits of the workers on one host, or in one cgroup (a
    pod), add up to more than it holds: the kernel, or the cgroup's OOM killer, then
    kills workers that are all within their limits, every worker of a pod at once.
    Returns the fraction of their limits the budget may count on (1.0: all of it)."""
    limits = {w.address: w.memory_limit for w in workers}
    hosts: dict[tuple[str, str], list[str]] = {}
    groups: dict[tuple[str, str, str], list[str]] = {}
    for address, info in layout.items():
        if address not in limits or not limits[address]:
            continue
        host = (str(info.get("hostname", "")), str(info.get("boot_id", "")))
        hosts.setdefault(host, []).append(address)
        if info.get("cgroup_limit"):
            groups.setdefault((*host, str(info.get("cgroup", ""))), []).append(address)
    scale = 1.0
    checks: list[tuple[str, list[str], int]] = []
    for host, members in hosts.items():
        total = _int(layout[members[0]].get("host_memory"))
        checks.append((f"host {host[0]}", members, total))
    for group, members in groups.items():
        total = _int(layout[members[0]].get("cgroup_limit"))
        checks.append((f"cgroup {group[2] or '/'} on {group[0]}", members, total))
    for where, members, holds in checks:
        wanted = sum(limits[a] for a in members)
        if holds <= 0 or wanted <= holds:
            continue
        scale = min(scale, holds / wanted)
        log.warning(
            "the memory limits of %d workers on %s add up to %.0f MiB, more than its "
            "%.0f MiB: a kernel or cgroup OOM kill can take them all at once; the memory "
            "budget counts %.0f%% of each limit", len(members), where, wanted / _MiB,
            holds / _MiB, 100 * holds / wanted, extra={"action": "memory_overcommitted"},
        )
    return scale


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
