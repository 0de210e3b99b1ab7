"""One job's durable output behind one object: the ledger, the part writer, the flush
policy and the manifest.

A part is written under hidden names and fsynced (writer.py), the ledger records the
intent, the files are renamed into place, and the part counts only once the ledger has
recorded it and its param ids in one SQLite transaction (store.py). Resume rolls a
leftover intent forward or back, refuses damaged parts or a lost ledger (verify.py), and
removes files the ledger does not know.

A failed write (disk full) raises :class:`~tidegate.writer.OutputWriteError` from
``flush``; the part's files are removed and its params, never committed, rerun on resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tidegate import __version__
from tidegate.codepaths import CodeDigest
from tidegate.errors import TidegateError
from tidegate.knobs import FlushPolicy
from tidegate.migrations import SchemaError
from tidegate.search import Outcome
from tidegate.simreturn import SimReturn, TargetResult, TaskError
from tidegate.spec import Job
from tidegate.states import JobState
from tidegate.store import Ledger, LedgerIds, LedgerMismatch, RecordedFile
from tidegate.verify import (
    OutputDamaged,
    check_parts,
    first_schemas,
    part_files_on_disk,
    roll_intents,
)
from tidegate.writer import (
    LEDGER,
    LOCK,
    FileInfo,
    OutputLock,
    OutputWriteError,
    PartWriter,
    WrittenPart,
    check_no_links,
    check_own_files,
    discard_output,
    is_no_space,
    part_name,
    publish,
    remove_files,
    remove_unrecorded,
    unpublish,
    write_manifest,
    write_without,
)

log = logging.getLogger(__name__)

# How often the loop looks whether a part written in the background is done.
STAGING_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Resumed:
    # Param ids already in a committed part: a set, or the ledger's look-up when many.
    committed: frozenset[str] | LedgerIds
    ok: int
    failed: int
    # name -> "int" | "float": the committed parts' type of a column, which the spec's
    # values are cast to (exactly) before they run and are written.
    casts: Mapping[str, str] = field(default_factory=dict)
    typed_ids: bool = False  # the output's params have the ids of an earlier release
    retried: int | None = None  # failed params un-committed to run again; None: no retry


@dataclass(frozen=True, slots=True)
class Orphans:
    """Committed params the spec no longer has: kept in the output, not in its counts."""

    count: int
    ok: int
    failed: int
    sample: list[dict[str, Any]]  # a few, each {"param_id": ..., "values": {...}}


class ParamTypeMismatch(LedgerMismatch):
    """The committed parts store a parameter column with a type the spec's values do not
    fit without loss (a float 0.5 where the parts hold int64)."""

    def __init__(self, path: Path, name: str, stored: str, wanted: str):
        self.path = path
        self.differs = [f"param_{name} type"]
        TidegateError.__init__(
            self,
            f"{path.parent} holds committed params whose param_{name} is {stored}; the "
            f"spec's {name} values are {wanted} and not all of them can be stored as "
            f"{stored} without loss (parameters.{name}: expected values that fit "
            f"{stored}); keep them so, or rerun with --restart to recompute the sweep "
            f"with {wanted} values",
        )


_KINDS = {"int": "int64", "float": "double", "bool": "bool", "str": "string"}


class CodeChanged(LedgerMismatch):
    """The job's code differs from the code its committed params were computed with:
    a plain resume would mix results of two code versions in one output."""

    def __init__(self, path: Path, changes: list[str]):
        self.path = path
        self.differs = ["code"]
        shown = ", ".join(changes[:CHANGES_SHOWN])
        if len(changes) > CHANGES_SHOWN:
            shown += f" and {len(changes) - CHANGES_SHOWN} more"
        what = f" ({shown})" if shown else ""
        TidegateError.__init__(
            self,
            f"{path.parent} holds params computed by other code: the job's code_paths "
            f"changed since{what}; rerun with --restart to recompute every param with "
            f"this code, or with --accept-code-change to keep the committed params and "
            f"compute the rest with this code (each part records its code hash)",
        )


CHANGES_SHOWN = 5
# Up to this many files, the ledger keeps each one's hash, so that a refused resume
# can name the files that changed.
CODE_FILES_KEPT = 2000


def _kind_of(t: pa.DataType) -> str | None:
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


@dataclass(frozen=True, slots=True)
class Flushed:
    part: int
    params: int
    nbytes: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A committed part rewritten without some of its params (:func:`rewrite_part`)."""

    old: int
    new: int | None  # None: no param was left, the old part is only forgotten
    kept: int
    dropped: int


@dataclass(frozen=True, slots=True)
class Retried:
    """The failed params un-committed for ``--retry-failed``, and the parts rewritten."""

    params: int
    parts: list[Rewritten]


@dataclass(frozen=True, slots=True)
class Pruned:
    """The orphaned params dropped from the output for ``--prune``, and the parts
    rewritten without them."""

    params: int
    parts: list[Rewritten]


@dataclass(frozen=True, slots=True)
class Closed:
    flushed: Flushed | None
    parts: int
    state: JobState  # the state asked for, or interrupted/failed if the last write failed
    error: OutputWriteError | None
    ok: int  # committed, per the ledger
    failed: int


class Commit:
    """Open with ``resume()``; ``record`` completed params; ``maybe_flush`` as time
    passes; ``close(state)`` flushes the rest and writes the final manifest."""

    def __init__(self, job: Job, policy: FlushPolicy, *, restart: bool = False,
                 retry_failed: bool = False,
                 manifest_extra: Mapping[str, Any] | None = None,
                 code: CodeDigest | None = None, accept_code_change: bool = False,
                 on_commit: Callable[[Sequence[tuple[str, str]]], None] | None = None):
        self.job = job
        # Told the (param id, status) of each part once the ledger committed it, on
        # the thread that committed it (a search tells its trials from here).
        self._on_commit = on_commit
        # The digest of the job's code paths; a resume whose code differs from the
        # output's is refused (CodeChanged) unless accepted or a retry of failed params.
        self._code = code
        self._accept_code_change = accept_code_change
        self.policy = policy
        self._restart = restart
        self._retry_failed = retry_failed
        self._extra = dict(manifest_extra or {})
        self._ledger: Ledger | None = None
        self._lock: OutputLock | None = None
        self._writer = PartWriter(
            job.output_dir, job.param_names, job.param_types, job.spec.outputs,
            [t.name for t in job.spec.targets],
        )
        self._last_flush = 0.0
        self._pool: ThreadPoolExecutor | None = None
        # The part written in the background: its number, its write, when it started,
        # and the watermark its commit records.
        self._staging: tuple[int, Future[WrittenPart], float, tuple[str, int] | None] \
            | None = None
        # The digest of the source the run walks, and how far its committed prefix
        # reaches once given params are committed (Pending.done): each part's commit
        # records it, so that a resume starts its walk there.
        self._watermark: tuple[str, Callable[[Iterable[str]], int]] | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("Commit.resume() was not called")
        return self._ledger

    @property
    def pending_params(self) -> int:
        return self._writer.pending_params

    def resume(self, now: float) -> Resumed:
        """Bind the ledger to this job (LedgerMismatch if it holds another one), remove
        files no committed part names, and write the manifest as ``running``."""
        job = self.job
        out = job.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(out, exc) from exc
        check_own_files(out)  # the lock's too: opened without following links, it would fail
        try:
            self._lock = OutputLock(out)
        except OSError as exc:  # its holder line is written: a full disk fails here
            raise OutputWriteError(out / LOCK, exc) from exc
        try:
            check_no_links(out)
            if self._restart:
                discard_output(out)
            if not (out / LEDGER).exists() and (parts := part_files_on_disk(out)):
                # Never clean these away as "not in the ledger": they may be all the results.
                raise OutputDamaged(out, [f"{len(parts)} part files, e.g. {parts[0]}"],
                                    what=f"the ledger {LEDGER} is missing beside")
            if not (out / LEDGER).exists():
                # Made here, not by SQLite: it says only "unable to open database file"
                # when the disk has no inode left; os.open says ENOSPC (a 0-byte file is
                # an empty database to SQLite).
                os.close(os.open(out / LEDGER, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                 | os.O_NOFOLLOW, 0o644))
            self._ledger = ledger = Ledger(out / LEDGER)
            resumed = ledger.bind(job.job_id, job.fingerprint, job.identity())
            self._bind_code(ledger)
        except (OSError, sqlite3.Error, SchemaError) as exc:
            self.close_ledger()
            if is_no_space(exc):  # a job starting on a full disk: interrupted, not failed
                raise OutputWriteError(out / LEDGER, exc) from exc
            raise
        except BaseException:
            self.close_ledger()
            raise
        try:
            for line in roll_intents(out, ledger):
                log.info("%s", line, extra={"action": "intent_resolved"})
            damage = check_parts(out, ledger, full=False)
            if damage:
                raise OutputDamaged(out, damage)
            removed = remove_unrecorded(out, ledger.files(), ledger.referenced_parts())
            # After the checks: a damaged part is refused before anything is rewritten.
            retried = retry_failed(out, ledger) if self._retry_failed else None
            names, casts = self._committed_columns(ledger)
            if names != job.param_names or casts:
                self._writer = PartWriter(
                    out, names, {**job.param_types, **casts}, job.spec.outputs,
                    [t.name for t in job.spec.targets])
            self._writer.schemas.update(first_schemas(out, ledger))
        except BaseException:
            self.close_ledger()
            raise
        if removed:
            log.info("removed %d part files not in the ledger", len(removed),
                     extra={"action": "debris_removed"})
        if retried is not None:
            log.info("retrying %d failed params (quarantined ones included): %d parts "
                     "rewritten without them", retried.params, len(retried.parts),
                     extra={"action": "params_retried"})
        counts = ledger.counts()
        if resumed:
            log.info("resuming job %s: %d of %d params already committed", job.job_id,
                     counts.params, job.n_params, extra={"action": "job_resumed"})
        self._last_flush = now
        self._manifest("running")
        return Resumed(ledger.committed_ids(), counts.ok, counts.failed,
                       casts, ledger.typed_ids(),
                       retried.params if retried is not None else None)

    def _bind_code(self, ledger: Ledger) -> None:
        """Compare the job's code with the output's, then record it: the ledger's meta
        and every part committed from now on carry its hash."""
        code = self._code
        if code is None:
            return
        stored = ledger.code()
        if stored is not None and stored[0] != code.hash and ledger.counts().params:
            changes = code.changes(stored[1]) if stored[1] is not None else []
            if not (self._accept_code_change or self._retry_failed):
                raise CodeChanged(ledger.path, changes)
            shown = ", ".join(changes[:CHANGES_SHOWN]) or "files not recorded"
            log.warning("job %s: its code changed since the committed params (%s); they "
                        "are kept and the rest run with this code (code %s)",
                        self.job.job_id, shown, code.hash[:12],
                        extra={"action": "code_changed"})
        files = code.files if len(code.files) <= CODE_FILES_KEPT else None
        ledger.set_code(code.hash, files)
        ledger.code_hash = code.hash

    def _committed_columns(self, ledger: Ledger) -> tuple[list[str], dict[str, str]]:
        """The parameter columns of the first committed params part: their order (kept:
        a file's columns or a grid's names may come in another order) and the casts
        that keep each column's type across parts (an int64 column stays int64 when the
        grown spec reads its whole numbers as floats). ParamTypeMismatch if the spec's
        values do not fit a column's type."""
        job = self.job
        first = next((f for cp in ledger.parts() for f in cp.files
                      if f.startswith("params/")), None)
        if first is None:
            return job.param_names, {}
        schema = pq.read_schema(job.output_dir / first)
        stored = {f.name.removeprefix("param_"): f.type for f in schema
                  if f.name.startswith("param_") and f.name != "param_id"}
        casts: dict[str, str] = {}
        for name in job.param_names:
            kind = _kind_of(stored[name]) if name in stored else None
            if kind is None or kind == job.param_types[name]:
                continue
            if kind not in job.param_fits[name]:
                raise ParamTypeMismatch(ledger.path, name, str(stored[name]),
                                        _KINDS[job.param_types[name]])
            casts[name] = kind
        names = [n for n in stored if n in job.param_types]
        return (names if sorted(names) == sorted(job.param_names) else job.param_names), casts

    def orphans(self, ids: set[str], sample: int = 5) -> Orphans:
        """Count ``ids`` (committed, no longer in the spec) by status, and read the
        values of the first few from the params parts."""
        ok, failed = self.ledger.statuses(ids)
        shown = sorted(ids)[:sample]
        rows: list[dict[str, Any]] = []
        if shown:
            files = [self.job.output_dir / f for f in self.ledger.files_of(shown)
                     if f.startswith("params/")]
            table = pa.concat_tables(
                [pq.read_table(f).filter(pc.field("param_id").isin(shown)) for f in files],
                promote_options="permissive") if files else None
            for row in table.to_pylist() if table is not None else []:
                values = {k.removeprefix("param_"): v for k, v in row.items()
                          if k.startswith("param_") and k != "param_id"}
                rows.append({"param_id": row["param_id"], "values": values})
            rows.sort(key=lambda r: r["param_id"])
        return Orphans(len(ids), ok, failed, rows)

    def outcomes(self, ids: set[str], target: str) -> dict[str, Outcome]:
        """The committed params ``ids`` as the output holds them: values, status and
        ``target``'s loss (a search squaring its study with the ledger on resume)."""
        files = self.ledger.files_of(ids) if ids else []
        keep = pc.field("param_id").isin(sorted(ids))
        out: dict[str, Outcome] = {}
        losses: dict[str, float | None] = {}
        for f in files:
            if f.startswith(f"targets/{target}/"):
                for row in pq.read_table(self.job.output_dir / f).filter(keep).to_pylist():
                    losses[row["param_id"]] = row["loss"]
        for f in files:
            if not f.startswith("params/"):
                continue
            for row in pq.read_table(self.job.output_dir / f).filter(keep).to_pylist():
                values = {k.removeprefix("param_"): v for k, v in row.items()
                          if k.startswith("param_") and k != "param_id"}
                out[row["param_id"]] = Outcome(values, row["status"] != "ok",
                                               losses.get(row["param_id"]))
        return out

    def prune(self, ids: AbstractSet[str],
              done: Callable[[Rewritten], None] | None = None) -> Pruned:
        """Drop the committed params ``ids`` (the orphans the walk found) from every
        dataset, one :func:`rewrite_part` per part holding any. The part being written in
        the background and the buffered params are committed first: a rewrite takes the
        next part number, which a part in flight would otherwise take too. ``done`` is
        told of each part rewritten (so that a failure midway still reports those). A
        failed write raises OutputWriteError; what was rewritten stays rewritten, the
        rest is left as it was (a rerun with --prune finishes it)."""
        self.flush()
        try:
            return prune_orphans(self.job.output_dir, self.ledger, ids, done=done)
        except (OSError, sqlite3.Error) as exc:
            # The intent (if any) is rolled forward or back by the next resume.
            raise OutputWriteError(self.ledger.path, exc) from exc

    def record(
        self,
        param_id: str,
        values: Mapping[str, Any],
        seeds: Sequence[int],
        error: TaskError | None,
        sims: Sequence[SimReturn] = (),
        targets: Sequence[TargetResult] = (),
    ) -> TaskError | None:
        """Buffer a completed param; returns the error it is recorded with (its own, or
        an OutputSchemaError if its outputs do not fit their datasets)."""
        return self._writer.add(param_id, values, seeds, error, sims, targets)

    def maybe_flush(self, now: float) -> Flushed | None:
        """Write a part if the policy says it is time, in the background: the Parquet
        encoding and fsync of a part (seconds for 128 MiB of results) run in a thread
        while the loop keeps collecting and refilling, so workers are not left idle
        behind a flush. Returns the part committed since the last call, if one was.

        One part is written at a time; while it is, new results buffer. Once they are
        twice what makes a part due, the loop waits for the write (back-pressure: the
        buffer stays bounded when the disk is slower than the results)."""
        flushed = self._finish_staged(wait=False)
        w, p = self._writer, self.policy
        due = (
            w.pending_params >= p.params
            or w.pending_bytes >= p.nbytes
            or (w.pending_params > 0 and now - self._last_flush >= p.seconds)
        )
        if not due:
            return flushed
        if self._staging is not None:
            if w.pending_params < 2 * p.params and w.pending_bytes < 2 * p.nbytes:
                return flushed
            flushed = self._finish_staged(wait=True)
        self._last_flush = now
        self._stage()
        return flushed

    def watermark(self, digest: str | None) -> int:
        """How far the committed prefix of the source of digest ``digest`` reaches (0 for
        a source without a digest)."""
        return self.ledger.watermark(digest) if digest else 0

    def track_watermark(self, digest: str, done: Callable[[Iterable[str]], int]) -> None:
        """Record with each part the committed prefix of the source of ``digest``,
        ``done(ids)`` once the part's ids are committed. Called on the thread that
        flushes (the run loop's), as parts are staged in the order they commit."""
        self._watermark = (digest, done)

    def start_clock(self, now: float) -> None:
        """The flush interval counts from here (the loop's start, once workers joined)."""
        self._last_flush = now

    def seconds_to_flush(self, now: float) -> float:
        """Seconds until a part is due; while one is written, when it may be done."""
        if self._staging is not None:
            return STAGING_POLL_S
        return self.policy.seconds - (now - self._last_flush)

    def flush(self) -> Flushed | None:
        """Commit the part being written, if any, and write and commit what is buffered,
        now. Returns the last part committed."""
        flushed = self._finish_staged(wait=True)
        if self._writer.pending_params:
            self._stage()
            flushed = self._finish_staged(wait=True) or flushed
        return flushed

    def _stage(self) -> None:
        taken = self._writer.take(self.ledger.next_part())
        mark = None
        if self._watermark is not None:
            # Here, not in the flush thread: parts are staged one at a time in the order
            # they commit, and a failed write ends the run before another is staged.
            digest, done = self._watermark
            mark = (digest, done(r["param_id"] for r in taken.buf.param_rows))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tidegate-flush")
        future = self._pool.submit(self._writer.write_taken, taken)
        self._staging = (taken.part, future, time.perf_counter(), mark)

    def _finish_staged(self, *, wait: bool) -> Flushed | None:
        """Record and publish the part written in the background, once it is written."""
        if self._staging is None:
            return None
        part, future, t0, mark = self._staging
        if not wait and not future.done():
            return None
        self._staging = None
        written = future.result()  # OutputWriteError: its temporaries are removed
        sizes = {f: RecordedFile(i.nbytes, i.sha256, i.tmp) for f, i in written.info.items()}
        ledger, out = self.ledger, self.job.output_dir
        try:
            ledger.record_intent(part, sizes, written.statuses)
            publish(out, written)
            ledger.commit(written.part, written.files, written.statuses, written.nbytes,
                          sizes, watermark=mark)
        except (OSError, sqlite3.Error, OutputWriteError) as exc:
            unpublish(out, written)
            with contextlib.suppress(sqlite3.Error):  # else resume rolls it back
                ledger.drop_intent(part)
            if isinstance(exc, OutputWriteError):
                raise
            raise OutputWriteError(ledger.path, exc) from exc
        if self._on_commit is not None:
            self._on_commit(written.statuses)
        # No manifest rewrite here: it carries the whole spec (13.5 MB for 100k inline
        # values, 0.5 s fsynced per part); the ledger has the counts, and the manifest is
        # written when the run starts and ends.
        return Flushed(part, len(written.statuses), written.nbytes, time.perf_counter() - t0)

    def close(self, state: JobState, error: OutputWriteError | None = None, *,
              reason: str | None = None) -> Closed:
        """Flush what is buffered (unless a write already failed: ``error``), write the
        manifest with the final state and close the ledger. A failed write makes the
        state interrupted (no space: a rerun resumes once space is freed) or failed.
        ``reason``: why a failed job stopped early, kept in the manifest."""
        flushed = None
        try:
            if error is None:
                try:
                    flushed = self.flush()
                except OutputWriteError as exc:
                    error = exc
            if error is not None:
                state = JobState.INTERRUPTED if error.no_space else JobState.FAILED
            try:
                self._manifest(state, reason)
            except OutputWriteError as exc:
                log.warning("manifest not updated: %s", exc,
                            extra={"action": "manifest_unwritten"})
                error = error or exc
            counts = self.ledger.counts()
            return Closed(flushed, counts.parts, state, error, counts.ok, counts.failed)
        finally:
            self.close_ledger()

    def close_ledger(self) -> None:
        """Close the ledger and release the output's lock, after a part still being
        written in the background (a failure elsewhere) is done and its temporaries are
        removed: its params were never committed and rerun on resume."""
        if self._staging is not None:
            _, future, _, _ = self._staging
            self._staging = None
            with contextlib.suppress(Exception):  # its own error: temporaries removed
                written = future.result()
                unpublish(self.job.output_dir, written)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _manifest(self, state: str, reason: str | None = None) -> None:
        counts = self.ledger.counts()
        job, spec = self.job, self.job.spec
        write_manifest(
            job.output_dir,
            {
                "schema_version": 1,
                "tidegate_version": __version__,
                "job_id": job.job_id,
                "state": state,
                **({"reason": reason} if reason else {}),
                "fingerprint": job.fingerprint,
                "spec": spec.model_dump(mode="json"),
                "source": job.source,
                "counts": {
                    "total": job.n_params,
                    "ok": counts.ok,
                    "failed": counts.failed,
                    "parts": counts.parts,
                },
                **self._extra,
                **({"code": {"hash": self._code.hash, "files": len(self._code.files),
                             "bytes": self._code.nbytes}} if self._code is not None else {}),
                "datasets": {
                    "params": "params",
                    "model_outputs": "model_outputs/<output>",
                    "targets": [f"targets/{t.name}" for t in spec.targets],
                },
                "updated_at": time.time(),
            },
        )


def _no_step(step: str) -> None:
    """The default hook of :func:`rewrite_part` (the tests crash the process there)."""


def rewrite_part(root: Path, ledger: Ledger, part: int, drop: AbstractSet[str], *,
                 step: Callable[[str], None] = _no_step) -> Rewritten:
    """Replace committed part ``part`` by a new version without the params ``drop``, in
    every dataset, so that each of them is in neither version once this returns (a rerun
    then computes them afresh) and every other param is in exactly one.

    The protocol is a part's commit with one more step: the new version is written under
    a new part number's hidden names (the old part's rows minus the dropped params, a row
    group at a time; a file left empty keeps its dataset's schema), the ledger records
    the intent naming the part it replaces, the files are renamed into place, one ledger
    transaction commits the new part and forgets the old one with its params rows, and
    then the old files are removed. A crash before the intent leaves temporaries that
    resume removes; after it, resume rolls the intent forward (its files all in place:
    the swap is committed, the old files removed) or back (the new files removed, the old
    part as it was); after the transaction, the old files are debris that resume removes.
    A part left with no param is only forgotten (one transaction) and its files removed.

    ``step`` is called after each step ("staged", "intent", "published", "committed",
    "removing" after each old file removed, "removed"): where the tests kill the
    process."""
    recorded = {cp.part: cp for cp in ledger.parts()}
    if part not in recorded:
        raise ValueError(f"part {part} is not committed")
    old_files = recorded[part].files
    every = ledger.part_statuses(part)
    statuses = [(pid, status) for pid, status in every if pid not in drop]
    dropped = len(every) - len(statuses)
    new: int | None = None
    if statuses:
        new = ledger.next_part()
        name = part_name(new)
        info: dict[str, FileInfo] = {}
        try:
            for rel in old_files:
                dst = f"{rel.rpartition('/')[0]}/{name}"
                info[dst] = write_without(root, rel, dst, drop)
        except BaseException:
            for i in info.values():
                (root / i.tmp).unlink(missing_ok=True)
            raise
        step("staged")
        written = WrittenPart(new, sorted(info), sum(i.nbytes for i in info.values()),
                              statuses, info)
        sizes = {f: RecordedFile(i.nbytes, i.sha256, i.tmp) for f, i in info.items()}
        ledger.record_intent(new, sizes, statuses, replaces=part)
        step("intent")
        publish(root, written)
        step("published")
        ledger.commit(new, written.files, statuses, written.nbytes, sizes, replaces=part)
    else:
        ledger.uncommit([part])
    step("committed")
    for rel in old_files:
        remove_files(root, [rel])
        step("removing")
    step("removed")
    return Rewritten(part, new, len(statuses), dropped)


def retry_failed(root: Path, ledger: Ledger, *,
                 step: Callable[[str], None] = _no_step) -> Retried:
    """Un-commit every param the ledger records as failed (quarantined ones too), one
    :func:`rewrite_part` per part holding any, so that the run computes them again."""
    failed = ledger.failed_params()
    by_part: dict[int, set[str]] = {}
    for pid, part in failed.items():
        by_part.setdefault(part, set()).add(pid)
    done = [rewrite_part(root, ledger, part, ids, step=step)
            for part, ids in sorted(by_part.items())]
    return Retried(len(failed), done)


def prune_orphans(root: Path, ledger: Ledger, ids: AbstractSet[str], *,
                  done: Callable[[Rewritten], None] | None = None,
                  step: Callable[[str], None] = _no_step) -> Pruned:
    """Drop the committed params ``ids`` from the output, one :func:`rewrite_part` per
    part holding any (parts left with none are only forgotten). Ids not committed are
    ignored, so a rerun after a crash midway prunes what is left."""
    by_part: dict[int, set[str]] = {}
    for pid, part in ledger.parts_of(ids).items():
        by_part.setdefault(part, set()).add(pid)
    rewritten: list[Rewritten] = []
    for part, drop in sorted(by_part.items()):
        r = rewrite_part(root, ledger, part, drop, step=step)
        rewritten.append(r)
        if done is not None:
            done(r)
    return Pruned(sum(r.dropped for r in rewritten), rewritten)
