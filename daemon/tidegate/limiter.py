"""The run loop's side of the controller (the Limiter to controller.py's Limit): turns
what the loop sees into observations, and holds the decision in force.

No I/O and no clock of its own: the loop hands in worker snapshots, measured results,
memory kills, its own pass times and the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tidegate.cluster import WorkerInfo
from tidegate.controller import Controller, ControllerConfig, Decision, Observation
from tidegate.outcome import Measured


@dataclass(slots=True)
class Limiter:
    controller: Controller
    replicates: int
    targets: int
    decision: Decision | None = None
    limits: dict[str, int] = field(default_factory=dict)  # worker address -> memory limit
    # The first result sizes end the slow start at once, not at the next poll.
    sizes_arrived: bool = False
    rtt: float = 0.001  # a scheduler round trip, measured by every poll
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
        """A decision from a fresh snapshot, and whether every worker was calm in it."""
        self.limits = {w.address: w.memory_limit for w in workers}
        obs = Observation(
            now=now, workers=tuple(w.memory() for w in workers), inflight=inflight,
            pending=pending, replicates=self.replicates, targets=self.targets,
        )
        self.decision = self.controller.decide(obs)
        calm = all(w.calm(self.config.low_water) for w in obs.workers)
        return self.decision, calm

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
        limit = self.limits.get(worker) or max(self.limits.values(), default=0)
        self.decision = self.controller.observe_oom(now)
        return self.decision, limit
