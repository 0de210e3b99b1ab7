"""SimReturn and TargetResult: what sim and agg tasks hand back, and how a model's
return value becomes Arrow IPC bytes on the worker.

Everything here runs on Dask workers as well as in tidegate, so it imports pyarrow and
the standard library only; the model's own table types (pandas, polars) are converted by
duck typing, never imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import json
import math
import os
import re
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tidegate.errors import TidegateError

# Target and output names become directory names (model_outputs/<name>/, targets/<name>/).
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
NAME_TEXT = "a name of 1-64 letters, digits, '_' or '-', not starting with a digit or '-'"

# Columns tidegate adds to every model output table; a model may return them only with
# tidegate's own values (models often echo their seed), which are then taken as they are.
RESERVED_OUTPUT_COLUMNS = ("param_id", "replicate", "seed")

_callables: dict[str, Callable[..., Any]] = {}

# The event run_sim logs as a sim starts on a watched worker (tidegate.worker exports it).
EXECUTING_TOPIC = "tidegate-executing"


class ContractError(TidegateError, TypeError):
    """A model broke its contract: it returned something other than a mapping of output
    name -> table, or a table whose id column (param_id, replicate, seed) differs from
    tidegate's values. Every param would fail alike, so the job stops at the first."""


@dataclass(frozen=True, slots=True)
class TaskError:
    """An exception raised by a model or a target, kept as plain strings so that no
    traceback object (and the frames it pins) ever travels or lingers. ``contract``:
    the model broke its contract (ContractError), which stops the job."""

    type: str
    message: str
    traceback: str = ""
    contract: bool = False

    @classmethod
    def from_exception(cls, exc: BaseException) -> TaskError:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc), tb, isinstance(exc, ContractError))

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass(frozen=True, slots=True)
class SimReturn:
    """The outputs of one replicate of one param: named tables as Arrow IPC bytes."""

    param_id: str
    replicate: int
    seed: int
    outputs: Mapping[str, bytes] = field(default_factory=dict)
    error: TaskError | None = None
    run_seconds: float = 0.0
    # How far the worker's RSS rose during the call (to its peak where the OS tells):
    # the working memory the simulation needed on top of what the worker held.
    rss_delta_bytes: int = 0
    # The worker whose thread still runs the model after sim_timeout_s (a thread cannot
    # be killed): tidegate restarts that worker to reclaim it.
    stuck_worker: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def nbytes(self) -> int:
        """Exact size of the outputs: the sum of their Arrow IPC byte lengths."""
        return sum(len(b) for b in self.outputs.values())

    def __sizeof__(self) -> int:
        # dask.sizeof falls back to sys.getsizeof, which calls this: the scheduler's
        # nbytes (and so its managed-memory accounting) is then exact.
        return self.nbytes + 256

    @property
    def names(self) -> list[str]:
        return list(self.outputs)

    def table(self, name: str) -> pa.Table:
        """The output table ``name``, decoded from its Arrow IPC bytes."""
        try:
            data = self.outputs[name]
        except KeyError:
            known = ", ".join(sorted(self.outputs)) or "none"
            raise KeyError(
                f"SimReturn of param {self.param_id} replicate {self.replicate} has no "
                f"output {name!r} (outputs: {known})"
            ) from None
        return ipc_to_table(data)

    def summary(self) -> ReplicateSummary:
        return ReplicateSummary(
            self.replicate, self.seed, self.nbytes, self.run_seconds, self.rss_delta_bytes,
            self.error, self.stuck_worker,
        )


@dataclass(frozen=True, slots=True)
class ReplicateSummary:
    """What tidegate needs to know of a replicate when its tables stay on the cluster."""

    replicate: int
    seed: int
    nbytes: int
    run_seconds: float
    rss_delta_bytes: int
    error: TaskError | None
    stuck_worker: str = ""


@dataclass(frozen=True, slots=True)
class TargetResult:
    """The result of one agg task: a target's loss for one param, or why there is none.

    ``replicates`` summarises the SimReturns the target saw, so tidegate learns their
    sizes and errors without the tables ever leaving the cluster.
    """

    param_id: str
    target: str | None
    loss: float | None
    diagnostics: Mapping[str, Any]
    error: TaskError | None
    replicates: tuple[ReplicateSummary, ...]
    run_seconds: float = 0.0

    def __sizeof__(self) -> int:
        return 512 + 64 * len(self.replicates) + len(json.dumps(self.diagnostics, default=str))


# --- conversions -----------------------------------------------------------------


def to_arrow(name: str, value: Any, ids: Mapping[str, Any] | None = None) -> pa.Table:
    """Turn one model output into a pyarrow.Table.

    Accepts a pyarrow Table or RecordBatch, anything with ``to_arrow()`` (polars), a
    pandas DataFrame (duck-typed on ``to_records``/``columns``), or a mapping of
    equal-length columns. A column named like one of tidegate's id columns is dropped
    when every value equals ``ids[column]`` (tidegate adds its own), else ContractError.
    """
    if isinstance(value, pa.Table):
        table = value
    elif isinstance(value, pa.RecordBatch):
        table = pa.Table.from_batches([value])
    elif hasattr(value, "to_arrow") and callable(value.to_arrow):
        table = value.to_arrow()
    elif type(value).__module__.startswith("pandas") and hasattr(value, "columns"):
        table = pa.Table.from_pandas(value, preserve_index=False)
    elif isinstance(value, Mapping):
        lengths = {k: _length(v) for k, v in value.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"output {name!r}: columns must have equal lengths, got "
                + ", ".join(f"{k}={n}" for k, n in lengths.items())
            )
        table = pa.table(dict(value))
    else:
        raise ContractError(
            f"output {name!r}: expected a pyarrow Table, a pandas or polars DataFrame or "
            f"a dict of equal-length columns, got {type(value).__name__}"
        )
    for column in [c for c in table.column_names if c in RESERVED_OUTPUT_COLUMNS]:
        expected = None if ids is None else ids.get(column)
        if expected is None or not _all_equal(table.column(column), expected):
            raise ContractError(
                f"output {name!r}: column {column!r} is one of tidegate's id columns "
                f"({', '.join(RESERVED_OUTPUT_COLUMNS)}); its values differ from tidegate's "
                f"({column} = {expected!r}): rename the column, or return tidegate's value"
            )
        table = table.drop_columns([column])
    return table.replace_schema_metadata(None)


def _all_equal(column: pa.ChunkedArray, value: Any) -> bool:
    """Every value of ``column`` is ``value`` (no nulls): an echoed id."""
    if column.null_count:
        return False
    try:
        values = column.to_pylist()
    except (pa.ArrowException, ValueError):
        return False
    # bool is an int in Python: True would pass for replicate 1.
    return all(type(v) is not bool and v == value for v in values)


def _length(column: Any) -> int:
    try:
        return len(column)
    except TypeError:
        raise TypeError(
            f"a column must be a sequence or array, got {type(column).__name__}"
        ) from None


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_all()


def outputs_to_ipc(value: Any, ids: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    if not isinstance(value, Mapping):
        raise ContractError(
            "a model must return a mapping of output name -> table, got "
            f"{type(value).__name__}"
        )
    out: dict[str, bytes] = {}
    for name, table in value.items():
        # The name becomes a directory under model_outputs/: the spec's rule for names.
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise ValueError(f"output names must be {NAME_TEXT}, got {shown}")
        out[name] = table_to_ipc(to_arrow(name, table, ids))
    return out


# --- importing user callables ------------------------------------------------------


def add_code_paths(paths: Sequence[str]) -> list[str]:
    """Put ``paths`` at the front of sys.path (once each). Returns those it inserted (not
    those already there)."""
    added: list[str] = []
    for p in reversed(list(paths)):
        if p not in sys.path:
            sys.path.insert(0, p)
            added.append(p)
    return added


# The code this process imports jobs' modules from: (key, code paths, the paths of them
# that use_code put on sys.path). A new key means another job (or another run of one):
# the modules loaded from the old and new code paths are evicted first, so nothing
# imported for an earlier job is reused. Only what use_code inserted leaves sys.path: a
# code path that was there already (a site directory, tidegate's own, a .pth entry) stays,
# or processes this one spawns (Dask's nannies copy sys.path) could not import tidegate.
_active_code: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
# Held across a swap and, by fresh_code, across the imports that follow it: two threads
# of one process never import under each other's code.
_code_lock = threading.RLock()


def _protected_dirs() -> tuple[str, ...]:
    import sysconfig

    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def _module_dirs(module: types.ModuleType) -> list[str]:
    where = [getattr(module, "__file__", None)]
    with contextlib.suppress(Exception):  # a namespace package has only __path__
        where += list(getattr(module, "__path__", None) or [])
    return [os.path.realpath(w) for w in where if isinstance(w, str)]


def evict_modules(paths: Sequence[str]) -> list[str]:
    """Remove from sys.modules every module loaded from under ``paths`` (tidegate's own
    and the standard library's and site-packages' never, whatever the paths cover).
    Returns the names of extension modules among them: a loaded shared object cannot be
    unloaded, so the process keeps running its code (a worker is restarted for that)."""
    roots = tuple(os.path.join(os.path.realpath(p), "") for p in paths)
    if not roots:
        return []
    protected = _protected_dirs()
    extensions: list[str] = []
    for name, module in list(sys.modules.items()):
        if module is None or name == "tidegate" or name.startswith("tidegate."):
            continue
        dirs = _module_dirs(module)
        if not any(d.startswith(roots) for d in dirs) or any(
                d.startswith(protected) for d in dirs):
            continue
        del sys.modules[name]
        file = getattr(module, "__file__", None) or ""
        if file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            extensions.append(name)
    return extensions


def use_code(paths: Sequence[str], key: str) -> list[str]:
    """Make ``paths`` this process's code for ``key``: if another key was active, its
    modules and those already loaded from ``paths`` are evicted, its paths leave
    sys.path and the import caches are invalidated. Returns the extension modules that
    could not be unloaded (see evict_modules); [] when ``key`` is already active."""
    global _active_code
    paths = tuple(str(p) for p in paths)
    with _code_lock:
        if _active_code is not None and _active_code[0] == key:
            return []
        old = _active_code[1] if _active_code is not None else ()
        inserted = _active_code[2] if _active_code is not None else ()
        stuck = evict_modules([*old, *paths])
        kept = [p for p in inserted if p in paths]
        for p in inserted:
            if p not in paths and p in sys.path:
                sys.path.remove(p)
        added = add_code_paths(paths)
        _callables.clear()
        importlib.invalidate_caches()
        _active_code = (key, paths, (*kept, *added))
        return stuck


def active_code_key() -> str | None:
    return _active_code[0] if _active_code is not None else None


@contextlib.contextmanager
def fresh_code(paths: Sequence[str]) -> Iterator[None]:
    """Import under ``paths`` afresh, for a check (the daemon's validation of a
    submission): a key of its own, held until the block ends."""
    with _code_lock:
        use_code(paths, f"check-{uuid.uuid4().hex}")
        yield


class RefOutsideModule(TidegateError, LookupError):
    """A callable reference whose attribute path leaves its module: the object it names
    is not defined in the module before ':' (an imported module, a builtin, a function
    imported from elsewhere). The allowlist checks that module, so this is what makes it
    apply to the whole reference."""


def import_callable(ref: str) -> Callable[..., Any]:
    """Import ``module:attr.path`` (cached per process). Every step of the path must be
    defined in ``module`` itself (its ``__module__`` is the module) and public (no leading
    ``_``), so a reference never reaches another module through an allowed one nor a
    private helper of one: RefOutsideModule otherwise."""
    fn = _callables.get(ref)
    if fn is not None:
        return fn
    module_name, _, attr = ref.partition(":")
    before = set(sys.modules)
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException:
        # Never cache a failed import: a module that raised leaves its parents and what
        # it imported so far (partly run) in sys.modules, and the finders keep their
        # listings; a fixed file must import afresh.
        for name in set(sys.modules) - before:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        raise
    walked = module_name + ":"
    parts = attr.split(".")
    for i, part in enumerate(parts):
        # Private names (`_run_child`) are helpers, not the module's public surface: an
        # allowed module is allowed for what it exports. Dunders are how a path escapes.
        if part.startswith("_"):
            kind = "a special name" if part.startswith("__") else "private (starts with '_')"
            raise RefOutsideModule(f"{ref}: {part!r} is {kind}; name a public function "
                                   f"or class defined in {module_name}")
        obj = getattr(obj, part)
        walked += ("." if i else "") + part
        if i == len(parts) - 1 and not callable(obj):
            raise TypeError(f"{ref} is a {type(obj).__name__}, not a callable")
        _check_defined_in(ref, walked, obj, module_name)
    _callables[ref] = obj
    return obj


def _check_defined_in(ref: str, walked: str, obj: Any, module_name: str) -> None:
    if isinstance(obj, types.ModuleType):
        raise RefOutsideModule(
            f"{ref}: {walked} is the module {obj.__name__}, not something defined in "
            f"{module_name}; a reference may not pass through another module"
        )
    home = getattr(obj, "__module__", None)
    if home != module_name:
        where = f"defined in {home}" if isinstance(home, str) else "not defined in a module"
        hint = f" (name it as '{home}:...')" if isinstance(home, str) else ""
        raise RefOutsideModule(
            f"{ref}: {walked} is {where}, not in {module_name}; a reference must name a "
            f"function or class defined in its module{hint}"
        )


# --- the functions Dask runs ---------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/self/status, in bytes (0 if unknown)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode()):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _WorkingMemory:
    """Measures how far the worker's RSS rose during a call: to its peak where Linux
    tells (VmHWM, reset before the call), else to its level after the call (which misses
    memory freed before returning). With several threads per worker the peak includes
    what the other threads' calls held meanwhile: an overestimate, on the safe side."""

    def __enter__(self) -> _WorkingMemory:
        self.peak_known = _reset_peak_rss()
        self.before = _status_bytes("VmRSS:")
        self.bytes = 0
        return self

    def __exit__(self, *exc: object) -> None:
        after = _status_bytes("VmHWM:" if self.peak_known else "VmRSS:")
        self.bytes = max(0, after - self.before) if self.before else 0


def run_sim(
    model: str, params: Mapping[str, Any], param_id: str, replicate: int, seed: int,
    timeout_s: float | None = None, code: tuple[Sequence[str], str] | None = None,
) -> SimReturn:
    """Run one replicate: call the model, convert its tables to IPC bytes.

    ``code``: the job's (code paths, key); a worker whose active key differs (it ran
    another job, or joined before the plugin told it) evicts that job's modules first.

    With ``timeout_s`` the model runs in a thread of its own and a call running longer
    fails as ``Timeout``; the thread cannot be killed and runs on, so the SimReturn
    names its worker (``stuck_worker``) for tidegate to restart.

    Any exception from the model (or from converting what it returned) becomes the
    SimReturn's error: the param is recorded as failed and the job goes on. That
    includes BaseExceptions (SystemExit, KeyboardInterrupt, GeneratorExit): raised on a
    worker's thread they would kill the worker, and the nanny's restarts would run the
    same param into the same exit until the cluster had no workers left.
    """
    if code is not None:
        use_code(*code)
    watch = _active_watch()
    start = time.perf_counter()
    call = _Call(model, params, {"param_id": param_id, "replicate": replicate, "seed": seed},
                 timeout_s)
    if watch is None:
        with _WorkingMemory() as memory:
            outputs, error = call()
        work = memory.bytes
    else:
        outputs, error, work = _watched_call(watch, call)
    return SimReturn(
        param_id=param_id,
        replicate=replicate,
        seed=seed,
        outputs=outputs,
        error=error,
        run_seconds=time.perf_counter() - start,
        rss_delta_bytes=work,
        stuck_worker=_worker_address() if call.stuck else "",
    )


# Sims run one after another inside one Dask task (worker.run_fused, run_params): the
# task's key is announced once, by its first sim (tidegate needs key -> worker, not a
# message per sim: a fused task of 5 ms sims sent 200 a second), and each sim begins
# from the tree reading its predecessor ended with instead of reading the tree again.
# Measured in one task of 200 5 ms sims on a one-thread worker, the watch's cost a sim
# (with it against without) fell from 1.1 ms to 0.2 ms.
_in_task = threading.local()


@contextlib.contextmanager
def one_task() -> Iterator[None]:
    """The sims run inside share one Dask task on this thread (reentrant)."""
    if getattr(_in_task, "active", False):
        yield
        return
    _in_task.active, _in_task.key, _in_task.rss = True, None, None
    try:
        yield
    finally:
        _in_task.active, _in_task.key, _in_task.rss = False, None, None
        task_ended()


def _watched_call(
    watch: Any, call: _Call
) -> tuple[dict[str, bytes], TaskError | None, int]:
    """The model's call on a worker with tidegate's memory watch: announced, charged its
    process tree's working memory, and MemoryExceeded if its child was killed."""
    key = _announce_executing()
    in_task = getattr(_in_task, "active", False)
    # The watch reads the worker process's peak RSS between its readings (and owns its
    # reset), so memory the model held only between two samples is charged too.
    token = watch.begin(key, _in_task.rss if in_task else None)
    try:
        outputs, error = call()
    finally:
        used = watch.end(token)
        if in_task:
            _in_task.rss = used.tree_rss or None
        else:
            task_ended()  # a task of this sim alone
    work = used.work_bytes
    if used.killed is not None:
        k = used.killed
        # Whatever the model made of its child's death (raised, or caught it and
        # returned), the sim is the one that ran the tree past the limit.
        outputs, error = {}, TaskError(
            "MemoryExceeded",
            f"child process {k.child_pid} was killed holding {k.child_rss / MiB:.0f} MiB: "
            f"the worker's process tree held {k.tree_rss / MiB:.0f} MiB of its "
            f"{k.limit / MiB:.0f} MiB memory limit",
        )
    return outputs, error, work


MiB = 1 << 20


class _Call:
    """One call of the model, in this thread or, with a timeout, in a thread of its own
    that is left running if the model does not return in time (``stuck``)."""

    def __init__(self, model: str, params: Mapping[str, Any], ids: Mapping[str, Any],
                 timeout_s: float | None):
        self.model, self.params, self.ids, self.timeout_s = model, params, ids, timeout_s
        self.stuck = False

    def __call__(self) -> tuple[dict[str, bytes], TaskError | None]:
        if self.timeout_s is None:
            return self._run()
        done: list[tuple[dict[str, bytes], TaskError | None]] = []
        # A daemon thread: a worker restarting to reclaim it does not wait for it.
        thread = threading.Thread(target=lambda: done.append(self._run()), daemon=True,
                                  name=f"tidegate-sim-{self.ids['param_id']}")
        thread.start()
        thread.join(self.timeout_s)
        if done:
            return done[0]
        self.stuck = True
        return {}, TaskError(
            "Timeout",
            f"the simulation ran longer than sim_timeout_s = {self.timeout_s:g} s; "
            "its worker is restarted to stop it",
        )

    def _run(self) -> tuple[dict[str, bytes], TaskError | None]:
        try:
            fn = import_callable(self.model)
            return outputs_to_ipc(fn(dict(self.params), self.ids["seed"]), self.ids), None
        except BaseException as exc:  # user code: see run_sim
            return {}, TaskError.from_exception(exc)


def _worker_address() -> str:
    """The address of the Dask worker running this task; "" outside one."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:
        return ""


def _active_watch() -> Any:
    """This process's tree watch, if tidegate.worker.MemoryWatch set one up. Looked up
    in sys.modules: the watch exists only where the plugin imported tidegate.memwatch,
    and run_sim imports nothing more (psutil, Dask) anywhere else."""
    memwatch = sys.modules.get("tidegate.memwatch")
    return memwatch.active_watch() if memwatch is not None else None


def _announce_executing() -> str:
    """Log the ``tidegate-executing`` event of the task running this sim; its key, ""
    outside a Dask task."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = str(worker.get_current_task())
    except Exception:
        return ""
    if getattr(_in_task, "active", False):
        if _in_task.key == key:  # this task's first sim announced it
            return key
        _in_task.key = key
    # First the record the nanny reads if this process dies (tidegate.starts): the
    # event below waits for the worker's event loop, which the model may keep busy.
    record = _start_record()
    if record is not None:
        record.started(key)
    with contextlib.suppress(Exception):
        worker.log_event(EXECUTING_TOPIC, {"worker": worker.address, "key": key})
    return key


def _start_record() -> Any:
    """This process's start record (tidegate.starts), if tidegate's plugin opened one
    and its watch runs (sims record only when watched: with the plugin removed, a
    target's start alone would be a record that misses the sims); looked up in
    sys.modules like the watch."""
    starts = sys.modules.get("tidegate.starts")
    if starts is None or _active_watch() is None:
        return None
    return starts.active_record()


def record_task_start() -> None:
    """Record the start of the Dask task running on this thread, without the event
    (a target task's: it is not a sim, but may be what its worker is killed for)."""
    record = _start_record()
    if record is None:
        return
    try:
        from distributed import get_worker

        key = str(get_worker().get_current_task())
    except Exception:
        return
    record.started(key)


def task_ended() -> None:
    """The Dask task on this thread returns: its start record slot names nothing."""
    record = _start_record()
    if record is not None:
        record.ended()


def run_target(
    function: str | None, target: str | None, param_id: str, *returns: SimReturn
) -> TargetResult:
    """Evaluate one target on all SimReturns of a param.

    With ``function`` None this only summarises the replicates (used when neither model
    outputs nor targets need the tables to leave the cluster). The target's exceptions,
    BaseExceptions included (as in run_sim), become the result's error.
    """
    summaries = tuple(r.summary() for r in returns)
    failed = next((r for r in returns if r.error is not None), None)
    if function is None or failed is not None:
        error = None
        if failed is not None and function is not None:
            error = TaskError(
                "ReplicateFailed",
                f"replicate {failed.replicate} failed, target not evaluated: {failed.error}",
            )
        return TargetResult(param_id, target, None, {}, error, summaries)
    _in_task.rss = None  # the user's target may hold memory: the next sim reads afresh
    start = time.perf_counter()
    try:
        loss, diagnostics = _loss_of(import_callable(function)(list(returns)))
        error = None
    except BaseException as exc:  # user code, as in run_sim
        loss, diagnostics, error = None, {}, TaskError.from_exception(exc)
    return TargetResult(
        param_id, target, loss, diagnostics, error, summaries, time.perf_counter() - start
    )


def _loss_of(value: Any) -> tuple[float, dict[str, Any]]:
    diagnostics: dict[str, Any] = {}
    if isinstance(value, Mapping):
        if "loss" not in value:
            raise ValueError(
                f"a target must return a float or {{'loss': float, 'diagnostics': {{...}}}}, "
                f"got a mapping with keys {sorted(value)}"
            )
        diagnostics = dict(value.get("diagnostics") or {})
        value = value["loss"]
    try:
        loss = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"a target's loss must be a number, got {type(value).__name__} {value!r}"
        ) from None
    if math.isnan(loss):
        raise ValueError("a target's loss must be a number, got NaN")
    # Diagnostics are stored as JSON text; fail here, on the worker, where the error
    # is attributed to this param, rather than at write time.
    json.dumps(diagnostics, default=str)
    return loss, diagnostics
