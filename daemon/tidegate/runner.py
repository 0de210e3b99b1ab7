"""One job's loop: admit params up to B, wait for completions, collect and judge them,
commit them, and poll the controller.

The loop never waits at a barrier: each pass fills the free slots of the window, waits
(briefly) for whichever params complete, gathers all of them in one call and releases
their tasks at once. About every ``poll_seconds`` it reads the workers' memory and asks
the controller for B; a worker lost to memory gets an immediate backoff. The policies
live elsewhere, as pure objects: the window (window.py), the judge of results
(outcome.py), the poison-param rules (losses.py), B (controller.py); durability is
commit.py's and every counter stats.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import psutil

from tidegate.cluster import ClusterPort, LossSource, SchedulerLost, WorkerInfo, WorkersLost
from tidegate.codepaths import CodeDigest, CodePathError, hash_code
from tidegate.commit import Commit, Rewritten
from tidegate.errors import TidegateError
from tidegate.failures import TRACEBACK_HINT, Breaker
from tidegate.fusion import chunks
from tidegate.knobs import RunOptions, controller_config
from tidegate.limiter import Limiter, check_layout
from tidegate.losses import Isolation, MemoryKill, Quarantine, WorkerLoss
from tidegate.metrics import Metrics
from tidegate.outcome import Disconnected, Failed, Result, Retry, RetryReason, judge, measure
from tidegate.params import ParamSource, Pending, typed_as
from tidegate.report import Progress, ProgressSink, RunSummary
from tidegate.search import SearchShrunk, SearchSource
from tidegate.simreturn import SimReturn, TargetResult, TaskError
from tidegate.spec import FieldError, Job, Param, SpecError
from tidegate.states import JobState
from tidegate.stats import RunStats
from tidegate.window import Admission, Entry, Lane, TaskKeys, Window
from tidegate.writer import OutputWriteError

__all__ = ["RunOptions", "Runner"]

def _process_started() -> float:
    """When this process started (epoch seconds), for the start-up time logged."""
    return float(psutil.Process().create_time())


T = TypeVar("T")
log = logging.getLogger(__name__)

# A search's parts come at least this often: a trial is told only once committed.
SEARCH_FLUSH_S = 1.0


class _Stopped(TidegateError):
    """Runner.stop came while the loop awaited the cluster."""


class Runner:
    """Runs one job on a connected cluster until it is done or stopped."""

    def __init__(
        self,
        job: Job,
        cluster: ClusterPort,
        options: RunOptions | None = None,
        *,
        progress: ProgressSink | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        source: ParamSource | None = None,
        no_workers_timeout_s: float = 30.0,
        code: CodeDigest | None = None,
    ):
        self.job, self.cluster, self.clock = job, cluster, clock
        # The digest of the job's code paths (the daemon's snapshot's); hashed from the
        # live tree at the start of the run when not given.
        self.code = code
        self.options = options or RunOptions()
        self.progress = progress
        self.source = source or job.params
        # A calibration: trials asked as slots free up, told once committed.
        self.search = self.source if isinstance(self.source, SearchSource) else None
        self.limiter = Limiter.of(controller_config(job, self.options), job.spec.replicates,
                                  len(job.spec.targets))
        self.limiter.fuse = job.spec.batch.fuse
        self.stats = RunStats(job.job_id, self.source.total, metrics or Metrics(), clock)
        self.stats.prune = self.options.prune
        self.isolation = Isolation()
        self.window: Window[Param] = Window(iter(()), 0)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a drain request interrupts the wait for results
        self._drain_deadline: float | None = None
        # A cluster without workers runs nothing: after this long the job pauses
        # (WorkersLost) rather than hang as running.
        self.no_workers_timeout_s = no_workers_timeout_s
        self._no_workers_since: float | None = None
        self._watch: LossSource | None = None
        self._known_workers: set[str] = set()
        self._lost_since_join = False
        self._requests: dict[str, int] = {}  # param id in flight -> its sims' request
        self._child_killed: dict[str, MemoryKill] = {}  # param id -> the kill it caused
        self.breaker = Breaker.of(job.spec.on_error)
        self._stuck: set[str] = set()  # workers whose sim thread outran sim_timeout_s
        self._admitted_any = False
        # Also set when the run ends by SchedulerLost: `tidegate run` prints it then.
        self.summary: RunSummary | None = None

    # --- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop admitting, drop the work in flight, flush what completed."""
        self._stop.set()

    def drain(self, timeout_s: float) -> None:
        """Stop admitting; let the params in flight finish for up to ``timeout_s``, then
        stop. Completed params are flushed either way."""
        deadline = self.clock() + timeout_s
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def batch_size(self) -> int:
        return self.stats.batch_size

    def snapshot(self) -> Progress:
        progress = self.stats.snapshot(self.window)
        if self.search is not None:
            progress = dataclasses.replace(progress, search=self.search.view())
        return progress

    # --- the run -------------------------------------------------------------------

    async def run(self) -> RunSummary:
        config = dataclasses.asdict(self.limiter.config)
        if self.code is None:
            self.code = await asyncio.to_thread(self._hash_code)
        code = self.code
        search, policy = self.search, self.options.flush
        if search is not None:
            if self.options.retry_failed:
                raise SpecError([FieldError(
                    "--retry-failed", "a sweep's failed params (a search tells its failed "
                    "trials as failed; raise parameters.search.trials to search on)",
                    "a search")], self.job.source)
            if not self.options.restart:
                try:
                    await asyncio.to_thread(search.check_budget)
                except SearchShrunk as exc:
                    raise SpecError([FieldError(exc.field, exc.expected, exc.got)],
                                    self.job.source) from None
            # A trial is told once its part is committed: parts come often enough that
            # the sampler learns of each result within a second.
            policy = dataclasses.replace(policy, seconds=min(policy.seconds, SEARCH_FLUSH_S))
        commit = Commit(self.job, policy, restart=self.options.restart,
                        retry_failed=self.options.retry_failed,
                        manifest_extra={"controller": config}, code=code,
                        accept_code_change=self.options.accept_code_change,
                        on_commit=search.committed if search is not None else None)
        resumed = commit.resume(self.clock())
        self.stats.start(resumed.ok, resumed.failed, retried=resumed.retried)
        state = JobState.FAILED
        write_error: OutputWriteError | None = None
        lost: SchedulerLost | None = None
        try:
            if search is not None:
                objective = search.spec.objective
                try:
                    await search.open(frozenset(resumed.committed),  # trials: a bounded few
                                      lambda ids: commit.outcomes(ids, objective))
                except SearchShrunk as exc:  # the journal changed since check_budget
                    raise SpecError([FieldError(exc.field, exc.expected, exc.got)],
                                    self.job.source) from None
                self.stats.search_progress(search.view())
            # A key of its own for every run: no worker reuses a module it imported for
            # another job, or for an earlier run of this one.
            key = f"{self.job.job_id}-{code.hash[:12]}-{uuid.uuid4().hex[:8]}"
            await self.cluster.add_code_paths([str(p) for p in self.job.code_paths], key)
            workers = await self.cluster.wait_for_workers(timeout_s=60)
            watch = self._watch = await self.cluster.watch_workers(self.clock)
            # Read again: the memory watch has just registered each worker's capacity.
            workers = await self.cluster.workers() or workers
            self.limiter.memory_scale = check_layout(await self.cluster.host_layout(),
                                                     workers)
            # Lazily: committed ids are skipped as the walk meets them, and those it never
            # meets (params removed from the spec) are known once it is over.
            source = self.source.typed_ids() if resumed.typed_ids else self.source
            # A search's trials are a bounded few, held as a set: its source is never
            # walked twice (a second walk would ask the sampler for new points).
            committed = frozenset(resumed.committed) if search else resumed.committed
            # The source's leading params the ledger counts as committed are skipped
            # without making their ids: a resume far into a 10^6 grid admits at once.
            digest = source.digest
            start = commit.watermark(digest)
            if start > min(len(committed), source.total):  # never: a ledger edited by hand
                log.warning("ignoring the ledger's watermark (%d, beyond the %d committed "
                            "params): walking from the first param", start, len(committed),
                            extra={"action": "watermark_ignored"})
                start = 0
            pending = Pending(source, committed, start=start, track=digest is not None)
            if digest is not None:
                commit.track_watermark(digest, pending.done)
            if start:
                log.info("skipping the first %d params without a look-up: all committed",
                         start, extra={"action": "resume_watermark"})
            fresh = map(typed_as(resumed.casts), pending) if resumed.casts else pending
            self.window = Window(fresh, self.source.total - len(resumed.committed),
                                 solo_beside=any(w.capacity > 0 for w in workers),
                                 exact=not resumed.committed)
            self._decide(workers)
            commit.start_clock(self.clock())
            await self._loop(commit, watch)
            orphans = pending.orphans()
            if orphans is not None:
                o = commit.orphans(orphans)
                self.stats.orphaned(o.count, o.ok, o.failed, o.sample)
            unfinished = self.stopping or not self.window.finished
            if self.options.prune:
                # Only a run that finished prunes: one stopped early may not have walked
                # the whole spec, and so not know which committed params are orphans.
                stopped = unfinished or self.breaker.reason is not None
                await self._prune(commit, None if stopped else orphans)
            if self.breaker.reason is not None:
                state = JobState.FAILED
            elif unfinished:
                state = JobState.INTERRUPTED
            elif self.stats.failed:
                state = JobState.COMPLETED_WITH_FAILURES
            else:
                state = JobState.SUCCEEDED
        except SchedulerLost as exc:
            state = JobState.INTERRUPTED  # the ledger has what completed; a rerun resumes
            lost = exc
        except OutputWriteError as exc:  # disk full: the buffered params rerun on resume
            write_error = exc
        finally:
            self.window.drop_all()
            await self.cluster.cancel_all()
            closed = commit.close(state, write_error, reason=self.breaker.reason)
            state = closed.state
            if search is not None:
                search.close()  # after the last part's tells
                self.stats.search_progress(search.view())
            self.stats.part_written(closed.flushed)
            if closed.error is not None:
                log.error("%s; %d params are committed, a rerun resumes", closed.error,
                          closed.ok + closed.failed, extra={"action": "output_write_failed"})
                self.stats.committed_only(closed.ok, closed.failed)
            self._report()
        output = str(self.job.output_dir)
        summary = self.stats.summary(state, output, closed.parts)
        summary.error = str(closed.error) if closed.error else None
        summary.reason = self.breaker.reason
        if search is not None:
            summary.search = search.view()
        if summary.failed:
            summary.tracebacks = TRACEBACK_HINT.format(output=output)
            self.stats.log_groups(summary.tracebacks)
        if self.breaker.reason is not None:
            log.error("job %s stopped: %s", self.job.job_id, self.breaker.reason,
                      extra={"action": "job_stopped"})
        self.summary = summary
        if lost is not None:
            raise lost
        return summary

    def _hash_code(self) -> CodeDigest:
        """The digest of the job's code paths as they are now, without the files that
        are the job's input or output rather than its code (its spec, its params file,
        its output directory); SpecError naming the code path if it cannot be taken."""
        job = self.job
        exclude = [job.output_dir, Path(job.source)]
        if job.spec.parameters.file is not None:
            exclude.append(job.base_dir / job.spec.parameters.file)
        try:
            return hash_code(job.code_paths, exclude=exclude, missing_ok=True)
        except CodePathError as exc:
            raise SpecError([FieldError(exc.field, exc.expected, exc.got)], job.source) from None

    async def _prune(self, commit: Commit, orphans: set[str] | None) -> None:
        """Drop the orphans from the output, after the walk and before the final
        manifest: no extra pass over the spec's params. The parts are rewritten off the
        event loop (a daemon keeps answering meanwhile); a kill midway leaves each param
        at most once, and a rerun with --prune finishes it."""
        if orphans is None:
            log.warning("not pruning: the run did not finish, so it may not have walked "
                        "the whole spec and its orphaned params are not known; rerun "
                        "with --prune",
                        extra={"action": "prune_skipped"})
            return
        self.stats.part_written(commit.flush())  # a rewrite takes the next part number
        self.stats.prune_started()
        if not orphans:
            return
        loop = asyncio.get_running_loop()

        def done(r: Rewritten) -> None:  # in the prune's thread
            loop.call_soon_threadsafe(self.stats.pruned_part, r.dropped)

        # The callbacks above are queued before the thread's result: counted first.
        work = asyncio.ensure_future(asyncio.to_thread(commit.prune, orphans, done))
        try:
            pruned = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be stopped: let it end before close() shuts its ledger.
            await asyncio.wait({work})
            raise
        log.info("pruned %d orphaned params (no longer in the spec): %d parts rewritten "
                 "without them", pruned.params, len(pruned.parts),
                 extra={"action": "params_pruned"})

    async def _loop(self, commit: Commit, watch: LossSource) -> None:
        poll_s, limiter = self.options.poll_seconds, self.limiter
        last_poll = self.clock()
        pass_started: float | None = None
        while not self.stopping:
            # Releasing a task schedules its release message on the event loop. Yield
            # once so the releases of the params just collected reach the scheduler
            # before the refill does; otherwise old and new window coexist there.
            await asyncio.sleep(0)
            for loss in watch.losses():
                await self._on_loss(loss, commit)
            if self._drain_deadline is not None:
                if not self.window.params or self.clock() >= self._drain_deadline:
                    break
            elif limiter.admit:
                await self._admit()
            self.stats.blocked(self._blocked_reason())
            if self.window.finished:
                break
            now = self.clock()
            # Decide right after a refill, when "is the window full" is meaningful.
            if limiter.decide_now() or now - last_poll >= poll_s:
                last_poll = now
                await self._poll()
            self._report()
            if pass_started is not None:
                limiter.loop_pass(time.perf_counter() - pass_started)
            timeout = min(commit.seconds_to_flush(now), poll_s - (now - last_poll))
            finished = await self._wait(max(0.01, timeout))
            pass_started = time.perf_counter()
            await self._collect(finished, commit)
            self.stats.part_written(commit.maybe_flush(self.clock()))
        self._report()

    async def _wait(self, timeout: float) -> list[str]:
        self._wake.clear()
        stop = asyncio.ensure_future(self._stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        got = asyncio.ensure_future(self.cluster.completed(timeout))
        try:
            await asyncio.wait({stop, wake, got}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()
        if not got.done():
            got.cancel()
            return []
        return got.result()

    # --- admission -----------------------------------------------------------------

    async def _admit(self) -> None:
        """Fill the window up to B. A suspect claims a whole worker and is admitted
        beside the rest where workers carry the memory resource; elsewhere the window
        drains and the suspect runs alone on the cluster."""
        w = self.window
        if w.solo_beside or not w.solo_waiting:
            room = self.batch_size - w.params
            if self.search is not None:
                # At most `parallel` trials in flight; each new one asked as its slot
                # frees up, knowing every trial told so far: a finished trial is told
                # once its part commits (within SEARCH_FLUSH_S), so the sampler may not
                # yet know the last second's results besides those in flight.
                room = min(room, self.search.parallel - w.params)
                await self.search.ask_ahead(room - w.queued)
            w.fill(room, self._submit)
            if not self._admitted_any and w.params:
                # When start-up ended: the time to the first admission is what a large
                # job's start-up costs (bench/scale_startup.py reads this line).
                self._admitted_any = True
                log.info("first params admitted, %.2f s after the process started",
                         time.time() - _process_started(), extra={"action": "first_admission"})
        elif (not w.params and self.isolation.calm_since_cancel  # before asking the workers
              and self.isolation.solo_may_start(await self.cluster.executing(self.job.job_id))):
            w.fill_solo(self._submit)
        self.stats.admitted(w.tasks)

    def _blocked_reason(self) -> str | None:
        w = self.window
        if w.to_admit == 0:
            return None
        if self.draining:
            return "draining"
        if not self.limiter.admit:
            return "memory"
        if w.solo_waiting and not w.solo_beside:
            return "solo"
        if w.params >= self.batch_size:
            return "pinned" if self.limiter.config.pinned is not None else "threads"
        return None

    def _submit(self, batch: Sequence[Admission[Param]]) -> Sequence[TaskKeys]:
        job, spec, limiter = self.job, self.job.spec, self.limiter
        # A param runs again split, one task per sim: whatever ended its attempt before
        # (a memory kill, a lost worker, a cancellation) is then one sim's, and a
        # suspect's memory is measured sim by sim.
        k = limiter.replicates_per_task()
        fuse = [1 if a.solo or a.attempt > 0 else k for a in batch]
        sized: dict[tuple[bool, int], int] = {}  # one sizing per kind of task, not per param
        for a, f in zip(batch, fuse, strict=True):
            if (a.solo, f) not in sized:
                sized[a.solo, f] = limiter.task_request(limiter.request(solo=a.solo), f)
        requests = [sized[a.solo, f] for a, f in zip(batch, fuse, strict=True)]
        groups = self._pack(batch, fuse, requests)
        keys = self.cluster.submit_params(
            job.job_id,
            [(a.param.param_id, a.param.values, job.seeds(a.param.param_id), a.attempt)
             for a in batch],
            spec.model, [(t.name, t.function) for t in spec.targets], spec.outputs != "none",
            requests=requests,
            # A suspect's sims go first in its worker's queue: it waits for the sims
            # running there to end, not for those queued behind it.
            priorities=[1 if a.solo else 0 for a in batch],
            sim_timeout_s=spec.sim_timeout_s,
            fuse=fuse,
            groups=groups,
        )
        for a, request in zip(batch, requests, strict=True):
            self._requests[a.param.param_id] = request
        self.stats.submitted(len({k for t in keys for k in t.sims}),
                             len(batch) * spec.replicates)
        return keys

    def _pack(self, batch: Sequence[Admission[Param]], fuse: list[int],
              requests: list[int]) -> list[int] | None:
        """Which of ``batch`` share a task (tidegate.fusion.pack_factor): first attempts
        fused whole, g at a time, as even as can be; their request becomes the task's
        (every sim's outputs counted). Never so few tasks that a thread would wait: a
        window of B params in tasks of g keeps at least two tasks per thread. None when
        no task is shared."""
        limiter, r = self.limiter, self.job.spec.replicates
        g = limiter.params_per_task()
        threads = sum(limiter.threads.values())
        if threads > 0:
            g = min(g, max(1, self.batch_size // (2 * threads)))
        whole = [i for i, (a, f) in enumerate(zip(batch, fuse, strict=True))
                 if not a.solo and a.attempt == 0 and f >= r]
        if g <= 1 or len(whole) <= 1:
            return None
        groups = [-1] * len(batch)
        sized: dict[int, int] = {}
        for n, chunk in enumerate(chunks(len(whole), g)):
            members = [whole[j] for j in chunk]
            if len(members) == 1:
                continue  # a task of its own, as unpacked
            if len(members) not in sized:
                sized[len(members)] = limiter.task_request(limiter.request(solo=False),
                                                           len(members) * r)
            request = sized[len(members)]
            for i in members:
                groups[i] = n
                requests[i] = request
        return groups

    # --- completion ----------------------------------------------------------------

    async def _collect(self, finished: list[str], commit: Commit) -> None:
        # Kills first: a param's result is judged knowing the kill it caused, when the
        # event came first (else its sim's own MemoryExceeded error tells).
        if self._watch is not None:
            for kill in self._watch.memory_kills():
                self._on_child_killed(kill)
        ready = self.window.complete(finished)
        if not ready:
            return
        # A task several params share is gathered once.
        keys = list(dict.fromkeys(k for e in ready for k in e.keys.gather))
        try:
            gathered = await self._while_workers(self.cluster.gather(keys))
        except _Stopped:
            return  # not committed: the next run runs them
        results = dict(zip(keys, gathered, strict=True))
        self.limiter.gathered()
        for entry in ready:
            chunk = _unfused([_own(results[k], entry.keys.slot) for k in entry.keys.gather])
            self.window.remove(entry.param_id)
            self._requests.pop(entry.param_id, None)
            self.cluster.release(entry.keys.all)
            self._judge(entry, chunk, commit)  # all of them, past a tripped breaker too
        for worker in sorted(self._stuck):
            # The sim's thread outran sim_timeout_s and cannot be killed: a new worker
            # process reclaims it (a planned loss, no OOM event, no backoff).
            log.warning("restarting worker %s: a simulation thread there outran "
                        "sim_timeout_s", worker, extra={"action": "worker_restarted"})
            await self.cluster.restart_worker(worker)
        self._stuck.clear()

    def _judge(self, entry: Entry[Param], results: Sequence[Result], commit: Commit) -> None:
        pid = entry.param_id
        outcome = judge(results, attempt=entry.attempt, connected=self.cluster.connected,
                        suspect=self.isolation.suspect(pid))
        if isinstance(outcome, Disconnected):
            raise SchedulerLost("lost the connection to the scheduler")
        if isinstance(outcome, Retry):
            if outcome.reason is RetryReason.KILLED_WORKER:
                log.info("param %s: KilledWorker after its worker died; resubmitting "
                         "(attempt %d)", pid, outcome.attempt, extra={"action": "param_retried"})
            self.window.requeue(entry.param, outcome.attempt)
            return
        measured = measure(results)
        self._stuck.update(r.stuck_worker for r in measured.replicates if r.stuck_worker)
        self.limiter.collected(measured)
        self.stats.measured(measured)
        error = outcome.error if isinstance(outcome, Failed) else None
        kill = self._child_killed.pop(pid, None)
        if kill is not None or (error is not None and error.type == "MemoryExceeded"):
            why = kill.text() if kill is not None else (error.message if error else "")
            alone = entry.solo or (kill is not None
                                   and self.limiter.ran_alone(kill.worker, kill.limit))
            if not alone:
                # The tree of every sim on the worker counted: rerun it alone to know.
                self.isolation.judge.forget(pid)
                self.stats.isolate(pid, 1)
                self.window.requeue(entry.param, entry.attempt + 1, Lane.SOLO)
                return
            message = (f"param {pid} needs more memory than a worker holds: ran alone on a "
                       f"worker as large as any, {why}. Give workers more memory or make "
                       "this simulation allocate less.")
            self.stats.quarantine(pid, message)
            error = TaskError("MemoryExceeded", message)
        self._record(entry.param, error, outcome.sims, outcome.targets, commit)

    def _record(self, param: Param, error: TaskError | None, sims: Sequence[SimReturn],
                targets: Sequence[TargetResult], commit: Commit) -> None:
        pid = param.param_id
        error = commit.record(pid, param.values, self.job.seeds(pid), error, sims, targets)
        if self.search is not None:
            self.search.completed(pid, None if error is not None
                                  else _loss_of(targets, self.search.spec.objective))
        self.isolation.forget(pid)
        self.stats.param_done(pid, error, param.values)
        reason = self.breaker.record(pid, error.type if error else None,
                                     error.message if error else "",
                                     contract=error is not None and error.contract)
        if reason is not None:
            self.stop()  # stop admitting; close() commits what completed

    # --- the cluster, the controller and memory kills -------------------------------

    async def _poll(self) -> None:
        if not self.cluster.connected:
            self.stats.cluster_unreadable()
            raise SchedulerLost(f"lost the connection to the scheduler at {self.cluster.address}")
        try:
            started = time.perf_counter()
            workers = await self.cluster.workers()
            self.limiter.round_trip(time.perf_counter() - started)
        except Exception as exc:  # a scheduler hiccup must not end the job
            self.stats.cluster_unreadable(exc)
            return
        self._check_workers(workers)
        self._decide(workers)
        await self._unstrand(workers)
        joined = {w.address for w in workers if w.capacity > 0} - self._known_workers
        self._known_workers = {w.address for w in workers if w.capacity > 0}
        if joined and self._lost_since_join and self.window.params:
            # Every worker may have died at once: their tasks then wait in no-worker,
            # and a worker whose resource was set after it joined does not wake them.
            self._lost_since_join = False
            placed = await self.cluster.place_waiting()
            if placed:
                log.info("%d tasks waiting for a worker placed on the workers that joined",
                         placed, extra={"action": "tasks_placed"})

    async def _unstrand(self, workers: Sequence[WorkerInfo]) -> None:
        """Params whose request no worker can hold any more (the largest worker left)
        would wait in Dask's no-worker state forever: submit them again, sized anew."""
        largest = max((w.capacity for w in workers), default=0)
        if not largest:
            return
        for pid, request in list(self._requests.items()):
            entry = self.window.get(pid)
            if entry is None or request <= largest:
                continue
            self.window.remove(pid)
            self._requests.pop(pid, None)
            await self.cluster.cancel(entry.keys.all)
            log.info("param %s: its %d MiB request exceeds every worker now; resubmitting",
                     pid, request // 2**20, extra={"action": "param_resized"})
            self.window.requeue(entry.param, entry.attempt + 1,
                                Lane.SOLO if entry.solo else Lane.RETRY)

    async def _while_workers(self, awaitable: Awaitable[T]) -> T:
        """Await a cluster call that waits on workers, reading them meanwhile. A gather
        of results whose workers died after completing them makes Dask recompute them
        and wait for that with no timeout; with no worker left it waits for ever (seen:
        a run hung past its 300 s test timeout, the loop idle in select). Here no
        workers for ``no_workers_timeout_s`` raises WorkersLost as it does between
        passes."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({task, stop}, timeout=self.options.poll_seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                if stop in done:  # stop drops the work in flight, this gather's too
                    raise _Stopped
                self._check_workers(await self.cluster.workers())
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _check_workers(self, workers: Sequence[WorkerInfo]) -> None:
        now = self.clock()
        if workers:
            self._no_workers_since = None
        elif self._no_workers_since is None:
            self._no_workers_since = now
            log.warning("the cluster at %s has no workers", self.cluster.address,
                        extra={"action": "no_workers"})
        elif now - self._no_workers_since >= self.no_workers_timeout_s:
            raise WorkersLost(f"the cluster at {self.cluster.address} has had no workers "
                              f"for {now - self._no_workers_since:.0f} s")

    def _decide(self, workers: Sequence[WorkerInfo]) -> None:
        self.stats.cluster_read(workers)
        now = self.clock()
        decision, calm = self.limiter.decide(
            workers, inflight=self.window.params, pending=self.window.to_admit, now=now)
        self.stats.decided(decision)
        self.stats.slots(decision, {w.address: w.name for w in workers})
        if calm:
            self.isolation.calm(now)

    async def _on_loss(self, loss: WorkerLoss, commit: Commit) -> None:
        self.stats.worker_lost(loss)
        self._lost_since_join = True
        if not loss.is_oom:
            await self._split_fused(loss)
            return
        decision, limit = self.limiter.memory_killed(loss.worker, self.clock())
        self.stats.oom_backoff(loss, limit, self.window.params)
        self.stats.decided(decision)
        w = self.window
        running = [pid for key in loss.culprits if (pid := w.owner(key)) is not None]
        if (w.solo_beside and loss.processing and not loss.recorded
                and loss.executing is not None and not loss.executing):
            # Killed before any task it held reported starting, and no start record
            # (tidegate.starts) to tell: the culprits are then every task there, a
            # suspect beside the others could never be told apart from what was queued
            # behind it, and every kill would strike them all again. Suspects run alone
            # on the cluster from here on: slower, but each run is a verdict.
            w.solo_beside = False
            log.warning("worker %s was killed for memory before any of its tasks reported "
                        "starting, and left no start record; from now on a param suspected "
                        "of needing more than a worker's memory runs alone on the cluster",
                        loss.worker, extra={"action": "solo_alone"})
        alone = w.solo_active
        if w.solo_beside:
            # A suspect holds its worker's whole memory resource: executing there, it ran
            # alone (cancelled tasks still running hold their share until they end). Its
            # sims head their worker's queue, so without start reports (``culprits`` is
            # then every task assigned there) a suspect the only param there ran too.
            owners = set(running)
            alone = next(iter(owners)) if len(owners) == 1 and w.is_solo(*owners) else None
        for action in self.isolation.on_memory_kill(loss, running, alone=alone,
                                                    limit=limit):
            if (entry := w.get(action.param_id)) is None:
                continue
            # Cancelled explicitly (a handful of tasks): Dask would otherwise run the
            # suspect again on the next worker.
            w.remove(entry.param_id)
            self.isolation.cancelled(self.clock())
            await self.cluster.cancel(entry.keys.all)
            if isinstance(action, Quarantine):
                self.stats.quarantine(action.param_id, action.message)
                error = TaskError("MemoryExceeded", action.message)
                self._record(entry.param, error, (), (), commit)
            else:
                self.stats.isolate(action.param_id, action.strikes)
                w.requeue(entry.param, entry.attempt + 1, Lane.SOLO)
        await self._split_fused(loss)

    async def _split_fused(self, loss: WorkerLoss) -> None:
        """A fused task that ran on a lost worker runs again split, one task per sim
        (any attempt after the first is, see _submit), not as Dask would rerun it: whole,
        into the same end if one of its sims is what the worker died of. Its strikes
        stay with its param, so poison isolation counts the kill as before. Every task
        the worker held, not only those it reported started: a worker killed just as a
        task started never sent that report, and splitting an innocent costs little."""
        w = self.window
        for pid in dict.fromkeys(p for key in loss.processing for p in w.owners(key)):
            entry = w.get(pid)
            if entry is None or not entry.keys.fused:
                continue  # split already: Dask's own rerun is the retry
            w.remove(pid)
            self._requests.pop(pid, None)
            await self.cluster.cancel(entry.keys.all)
            log.info("param %s: its fused task was on lost worker %s; resubmitting it split, "
                     "one task per sim (attempt %d)", pid, loss.worker, entry.attempt + 1,
                     extra={"action": "param_split"})
            w.requeue(entry.param, entry.attempt + 1, Lane.SOLO if entry.solo else Lane.RETRY)

    def _on_child_killed(self, kill: MemoryKill) -> None:
        """A worker's tree passed its terminate fraction and the plugin killed a sim's
        child: an OOM event (back off) that the sim's result then carries."""
        pid = self.window.owner(kill.key)
        self.stats.child_killed(kill, pid)
        decision, _ = self.limiter.memory_killed(kill.worker, self.clock())
        self.stats.decided(decision)
        if pid is not None:
            self._child_killed[pid] = kill

    def _report(self) -> None:
        self.stats.gauges(self.window)
        if self.search is not None:
            self.stats.search_progress(self.search.view())
        if self.progress is not None:
            self.progress.update(self.snapshot())


def _own(result: Any, slot: int) -> Result | list[Result]:
    """A param's part of a task's result: where params share a task (run_params), its
    item of the list; a failure of the task (a TaskFailure) is every param's."""
    if slot < 0 or not isinstance(result, list):
        return cast("Result | list[Result]", result)
    return cast("list[Result]", result[slot])


def _unfused(results: Sequence[Result | list[Result]]) -> list[Result]:
    """A param's results one per sim or target: a fused task (run_fused) returns a
    list of them, a failed one a single TaskFailure that stands for all it ran."""
    return [r for item in results for r in (item if isinstance(item, list) else [item])]


def _loss_of(targets: Sequence[TargetResult], objective: str) -> float | None:
    """The objective target's loss, or None if it has none (it failed)."""
    for t in targets:
        if t.target == objective:
            return t.loss if t.error is None else None
    return None
