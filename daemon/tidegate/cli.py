"""``tidegate run | validate | schema | verify | failures | best | serve``; the client
commands are in client.py.

Exit codes: :class:`tidegate.exitcodes.RunExit` and ``ServeExit``, listed in each
command's ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tidegate import __version__
from tidegate.errors import TidegateError, error_json
from tidegate.exitcodes import RunExit, ServeExit, VerifyExit, epilog
from tidegate.logs import quiet_dask_logs, setup_logging

log = logging.getLogger("tidegate")

# Restarts of the embedded cluster one `tidegate run` makes after its workers are lost
# for good: enough to ride out a bad moment, few enough that a job that kills its
# workers every time ends instead of looping.
CLUSTER_RESTARTS = 3


class UsageError(TidegateError):
    """Bad input on the command line."""


class BadArguments(UsageError):
    """argparse refused the command line; the message (already on stderr, with the
    usage) says why."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but an error is raised with its message, so that main() can
    also print it as JSON under --json. Subcommands' parsers are of the same class."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise BadArguments(message)


def _common_options() -> argparse.ArgumentParser:
    """Options accepted after the subcommand as well as before it. Their default is
    SUPPRESS, so that a subcommand's parser does not overwrite a value given before the
    subcommand with its own default; main() fills in the default."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="log level (default INFO; env TIDEGATE_LOG_LEVEL)")
    return common


LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}: expected a whole number >= 1, got {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}: expected a whole number >= 1, got {value}")
        return value

    return parse


def _positive_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag}: expected a number > 0, got {text!r}")
        return value

    return parse


def _knob_flag(knob: str, flag: str) -> Callable[[str], Any]:
    """Read a controller knob's flag by the knob's own rules (tidegate.knobs)."""

    def parse(text: str) -> Any:
        from tidegate.knobs import KnobError, knob_from_flag

        try:
            return knob_from_flag(knob, flag, text)
        except KnobError as exc:
            raise argparse.ArgumentTypeError(str(exc.errors[0])) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tidegate",
        description="Run simulation parameter sweeps on Dask in a bounded, memory-aware window.",
    )
    parser.add_argument("--version", action="version", version=f"tidegate {__version__}")
    # No default here either: main() tells a level given (before or after the command)
    # from none, which `serve` needs, since a given one overrides its config's log.level.
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
        help="log level (default INFO; env TIDEGATE_LOG_LEVEL); also accepted after the "
        "command",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    run = _command(sub, common, "run", "run a job spec to completion (resumes if interrupted)")
    run.add_argument("spec", type=Path, help="job spec (YAML)")
    run.add_argument("--scheduler", metavar="ADDRESS",
                     help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 "
                     "(default: start an embedded LocalCluster)")
    run.add_argument("--workers", type=_positive_int("--workers"), metavar="N",
                     help="embedded cluster: worker processes (default: one per core)")
    run.add_argument("--threads-per-worker", type=_positive_int("--threads-per-worker"),
                     metavar="N", help="embedded cluster: threads per worker")
    run.add_argument("--memory-limit", metavar="SIZE",
                     help="embedded cluster: memory limit per worker, e.g. 2GiB (default: "
                     "the machine's memory divided among the workers)")
    run.add_argument("--no-workers-timeout", type=_positive_float("--no-workers-timeout"),
                     metavar="S", help="seconds the cluster may have no workers before the "
                     "run pauses; an embedded cluster is then restarted and the job resumes "
                     f"(up to {CLUSTER_RESTARTS} times), on --scheduler the run exits 130 "
                     "(default 30; env TIDEGATE_CLUSTER__NO_WORKERS_TIMEOUT_S)")
    run.add_argument("--output", type=Path, metavar="DIR",
                     help="job output directory (default: the spec's `output`)")
    run.add_argument("--batch-size", type=_positive_int("--batch-size"), metavar="N",
                     help="pin B, the params in flight (default: TIDEGATE_BATCH_SIZE, "
                     "MODELOPS_JOB_BATCH_SIZE, the spec's batch.size, else adaptive)")
    run.add_argument("--restart", action="store_true",
                     help="discard earlier output of this job (tidegate's own files only) "
                     "and start again")
    run.add_argument("--retry-failed", action="store_true",
                     help="run again the params the output records as failed or quarantined "
                     "(after a fix of the model); the other params stay as committed")
    run.add_argument("--accept-code-change", action="store_true",
                     help="resume although the job's code_paths changed since its committed "
                     "params: keep them, compute the rest with the new code (each part "
                     "records its code hash); refused otherwise (exit 2)")
    run.add_argument("--prune", action="store_true",
                     help="at the end of the run, drop from the output the committed params "
                     "the spec no longer has (orphaned); the others stay as committed")
    run.add_argument("--force", action="store_true",
                     help="write into an output directory that is not empty and holds no "
                     "tidegate manifest or ledger")
    run.add_argument("--flush-params", type=_positive_int("--flush-params"), default=1000,
                     metavar="N", help="write a part every N completed params (default 1000)")
    run.add_argument("--flush-seconds", type=_positive_float("--flush-seconds"), default=10.0,
                     metavar="S", help="... or every S seconds (default 10)")
    run.add_argument("--memory-fraction", type=_knob_flag("memory_fraction", "--memory-fraction"),
                     metavar="F", help="share of each worker's memory limit that results "
                     "in flight may use (default 0.5; env TIDEGATE_CONTROLLER__MEMORY_FRACTION)")
    run.add_argument("--metrics-port", type=_positive_int("--metrics-port"), metavar="PORT",
                     help="serve Prometheus metrics on 127.0.0.1:PORT/metrics during the run")
    run.add_argument("--max-params", type=_positive_int("--max-params"), metavar="N",
                     help="refuse a job of more parameter sets (default 10000000)")
    run.add_argument("--max-replicates", type=_positive_int("--max-replicates"), metavar="N",
                     help="refuse more replicates per parameter set (default 1000000)")
    run.add_argument("--max-tasks", type=_positive_int("--max-tasks"), metavar="N",
                     help="refuse a job of more tasks, params x (replicates + targets) "
                     "(default 100000000)")
    run.add_argument("--max-file-bytes", type=_positive_int("--max-file-bytes"), metavar="N",
                     help="refuse a larger params file (parameters.file; default 4294967296)")
    run.add_argument("--json", action="store_true",
                     help="print the final summary as one JSON object on stdout")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    run.add_argument("--limit", type=_positive_int("--limit"), metavar="N",
                     help="a trial: run only the first N params (at most 100) on one local "
                     "worker into a scratch directory, never the job's output, and print "
                     "the tables they return and their failures")

    validate = _command(sub, common, "validate", "check a job spec and import its callables")
    validate.add_argument("spec", type=Path, help="job spec (YAML)")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.add_argument("--try", dest="trial", type=_positive_int("--try"), metavar="N",
                          help="also run the first N params (at most 100) on one local "
                          "worker into a scratch directory and print the tables they "
                          "return and their failures")

    _command(sub, common, "schema", "print the JSON Schema of the job spec")

    verify = _command(sub, common, "verify", "check a job output against its ledger (sizes, "
                      "checksums, Parquet, param ids)")
    verify.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="a job's output")
    verify.add_argument("--repair", action="store_true",
                        help="un-commit damaged parts (a rerun recomputes their params), "
                        "roll back unfinished ones, or rebuild a lost ledger from the parts")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    failures = _command(sub, common, "failures", "list a job output's failed params by kind, "
                        "with their values and tracebacks")
    failures.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="a job's output")
    failures.add_argument("--json", action="store_true", help="print the groups as JSON")

    best = _command(sub, common, "best", "list a job output's params with the lowest loss "
                    "(a search's best trials), with their values")
    best.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="a job's output")
    best.add_argument("--top", type=_positive_int("--top"), default=10, metavar="N",
                      help="how many (default 10)")
    best.add_argument("--target", metavar="NAME",
                      help="the target whose loss ranks them (default: a search's "
                      "objective, else the job's first target)")
    best.add_argument("--json", action="store_true",
                      help="print them as a JSON list: rank, loss, param_id, trial (a "
                      "search's), values")

    serve = _command(sub, common, "serve", "run the daemon: job queue, HTTP API, /metrics")
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="daemon config (YAML); TIDEGATE_* variables and flags override it")
    for flag, key, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=key.replace(".", "__"), type=kind, metavar=key.upper(),
                           help=f"config key {key}: {text}")

    from tidegate.client import add_client_commands

    add_client_commands(sub, parents=[common])
    return parser


def _command(sub: Any, common: argparse.ArgumentParser, name: str,
             help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its exit codes."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, epilog=epilog(name), parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


# `tidegate serve` flags, one per config key.
_SERVE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--listen", "listen", str, "HOST:PORT of the HTTP API (default 127.0.0.1:8790)"),
    ("--state-dir", "state_dir", Path, "where the job queue (SQLite) lives"),
    ("--output-root", "output_root", Path, "where job outputs go"),
    ("--scheduler", "cluster.address", str, "a Dask scheduler; empty: embedded LocalCluster"),
    ("--workers", "cluster.local.workers", int, "embedded cluster: worker processes"),
    ("--threads-per-worker", "cluster.local.threads_per_worker", int,
     "embedded cluster: threads per worker"),
    ("--memory-limit", "cluster.local.memory_limit", str,
     "embedded cluster: memory limit per worker"),
    ("--drain-timeout", "drain_timeout_s", float,
     "seconds SIGTERM waits for params in flight"),
    ("--code-roots", "security.code_roots", lambda t: [p for p in t.split(",") if p],
     "comma-separated directories that job code_paths may lie in"),
    ("--max-params", "limits.max_params", int, "parameter sets per job"),
    ("--max-replicates", "limits.max_replicates", int, "replicates per parameter set"),
    ("--max-tasks", "limits.max_tasks", int, "tasks per job: params x (replicates + targets)"),
    ("--log-format", "log.format", str, "text or json"),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except BadArguments as exc:  # the message is on stderr already
        # No namespace to ask: the flag is looked for among the options (before a "--").
        options = argv[: argv.index("--")] if "--" in argv else argv
        if "--json" in options:
            print(error_json(str(exc), RunExit.USAGE))
        return RunExit.USAGE
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    args.log_level_given = getattr(args, "log_level", None)
    args.log_level = args.log_level_given or os.environ.get("TIDEGATE_LOG_LEVEL", "INFO")
    setup_logging(args.log_level)
    handlers = {"run": cmd_run, "validate": cmd_validate, "schema": cmd_schema,
                "serve": cmd_serve, "verify": cmd_verify, "failures": cmd_failures,
                "best": cmd_best}
    from tidegate.migrations import SchemaError
    from tidegate.spec import SpecError
    from tidegate.store import LedgerMismatch
    from tidegate.validation import ValidationFailed
    from tidegate.verify import OutputDamaged
    from tidegate.writer import OutputError, OutputWriteError

    if args.command not in handlers:
        from tidegate.client import run_client_command

        return run_client_command(args)
    try:
        return handlers[args.command](args)
    except (SpecError, LedgerMismatch, SchemaError, UsageError, ValidationFailed,
            OutputError, OutputDamaged) as exc:
        return fail(args, str(exc),
                    ServeExit.CONFIG if args.command == "serve" else RunExit.USAGE)
    except TrialClusterError as exc:
        return fail(args, str(exc), RunExit.CLUSTER)
    except OutputWriteError as exc:  # before the run started: nothing was written
        if exc.no_space:  # the output's directory, lock or ledger: the disk may free up
            return fail(args, f"{exc}; free space and rerun", RunExit.INTERRUPTED)
        return fail(args, str(exc), RunExit.FAILED)


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Report an error that ends a command: on stderr, and under --json also as a JSON
    object on stdout."""
    print(f"tidegate: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(error_json(message, code))
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    from tidegate.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return RunExit.OK


def cmd_failures(args: argparse.Namespace) -> int:
    """The failed params of an output's committed parts, grouped by kind (failures.py),
    each group with three examples: their values and tracebacks."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from tidegate.failures import groups_of

    root: Path = args.output
    params_dir = root / "params"
    if not params_dir.is_dir():
        raise UsageError(f"OUTPUT_DIR: expected a job output directory, got {str(root)!r} "
                         "(no params/ dataset in it)")
    try:
        table = ds.dataset(params_dir, format="parquet").to_table()
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"OUTPUT_DIR: cannot read {params_dir}: {exc}") from None
    names = [c.removeprefix("param_") for c in table.column_names
             if c.startswith("param_") and c != "param_id"]
    failed = table.filter(pa.compute.equal(table["status"], "failed")).to_pylist()
    groups = groups_of(failed, names)
    tracebacks = {r["param_id"]: r.get("traceback") or "" for r in failed}
    listed = []
    for group in groups.as_list():
        for example in group["examples"]:
            example["traceback"] = tracebacks.get(example["param_id"], "")
        listed.append(group)
    if args.json:
        print(json.dumps({"output": str(root), "params": table.num_rows,
                          "failed": len(failed), "groups": listed}, default=str))
        return RunExit.OK
    print(f"{root}: {len(failed)} of {table.num_rows} committed params failed, "
          f"{len(listed)} kinds")
    for group in listed:
        print(f"\n{group['count']} x {group['type']}: {group['message']}")
        for example in group["examples"]:
            values = ", ".join(f"{k}={v!r}" for k, v in example["values"].items())
            print(f"  param {example['param_id']} {{{values}}}: {example['message']}")
        first = group["examples"][0]["traceback"] if group["examples"] else ""
        if first:
            print("  traceback of the first:")
            print("\n".join("    " + line for line in first.rstrip().splitlines()))
    return RunExit.OK


def cmd_best(args: argparse.Namespace) -> int:
    """The params of an output with the lowest loss of a target (best.py)."""
    from tidegate.best import NotRanked, dumps, rank

    try:
        ranking = rank(args.output, args.top, args.target)
    except NotRanked as exc:
        raise UsageError(str(exc)) from None
    print(dumps(ranking) if args.json else ranking.text())
    return RunExit.OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Check an output; exit 0 clean, 1 damage found, 2 bad input (or, with --repair, an
    output a run holds)."""
    from tidegate.verify import part_files_on_disk
    from tidegate.writer import LEDGER, MANIFEST, OutputLock, OutputLocked, check_own_files

    root: Path = args.output
    if not root.is_dir():
        raise UsageError(f"OUTPUT_DIR: expected a job output directory, got {str(root)!r} "
                         "(not a directory)")
    check_own_files(root)  # the ledger is opened, and --repair writes it
    if not (root / LEDGER).exists() and not part_files_on_disk(root):
        # Before the lock: --repair must not leave a lock file in a directory that is
        # not an output.
        raise UsageError(f"OUTPUT_DIR: {root} holds no {LEDGER}, {MANIFEST} or part "
                         "files: not a tidegate output")
    if not args.repair:
        return _verify(args, root, [])
    # A repair un-commits parts and removes files: under a running job it would take away
    # a part the run has counted, and the run would then report success over lost data.
    try:
        lock = OutputLock(root)
    except OutputLocked as exc:
        raise OutputLocked(f"--repair refused: {exc}; a repair under a running job would "
                           "un-commit parts the run has counted") from None
    try:
        return _verify(args, root, [])
    finally:
        lock.release()


def _verify(args: argparse.Namespace, root: Path, notes: list[str]) -> int:
    from tidegate.store import Ledger
    from tidegate.verify import (
        Repaired,
        check_parts,
        link_damage,
        part_files_on_disk,
        rebuild_ledger,
        report_json,
        roll_intents,
        uncommit_damaged,
    )
    from tidegate.writer import LEDGER, MANIFEST, check_no_links, lock_holder

    if args.repair:
        # Nothing is repaired through a link: un-committing a linked part would remove
        # the link and lose the copy it stands for from the output.
        check_no_links(root)

    if not args.repair and (holder := lock_holder(root)):
        # Read-only, so allowed; but a part may be mid-commit (an intent, or files renamed
        # ahead of the ledger's commit), and what is reported may change under it.
        print(f"tidegate: warning: {root} is in use by a run ({holder}); this report may "
              "show a part mid-write", file=sys.stderr)
        notes.append(f"in use by a run ({holder}); a part may be mid-write")
    repaired: Repaired | None = None
    damage: list[Any] = []
    if not (root / LEDGER).exists():
        parts = part_files_on_disk(root)
        if not parts:
            raise UsageError(f"OUTPUT_DIR: {root} holds no {LEDGER}, {MANIFEST} or part "
                             "files: not a tidegate output")
        if not args.repair:
            damage = [f"the ledger {LEDGER} is missing beside {len(parts)} part files"]
        else:
            repaired = rebuild_ledger(root)
            notes.append(f"rebuilt {LEDGER} from {len(parts)} part files")
    if not damage:
        with Ledger(root / LEDGER) as ledger:
            for line in roll_intents(root, ledger) if args.repair else []:
                notes.append(line)
            if not args.repair and ledger.intents():
                notes.append(f"{len(ledger.intents())} unfinished part(s); the next run "
                             "(or --repair) rolls them forward or back")
            damage = check_parts(root, ledger, full=True)
            if damage and args.repair:
                repaired = uncommit_damaged(root, ledger, damage)
                notes.append(f"{repaired.params_uncommitted} params un-committed; a rerun "
                             "recomputes them")
                damage = check_parts(root, ledger, full=True)
            damage += link_damage(root, damage)
            counts = ledger.counts()
            notes.insert(0, f"{counts.parts} parts, {counts.params} params ({counts.ok} ok, "
                         f"{counts.failed} failed), ledger schema {ledger.schema_version}")
    if args.json:
        print(report_json(root, damage, repaired, notes))
    else:
        lines = [f"{root}:"] + [f"  {n}" for n in notes]
        lines += [f"  repaired: {r}" for r in (repaired.lines if repaired else [])]
        lines += [f"  damaged: {d}" for d in damage]
        if damage:
            lines.append(f"damage found; `tidegate verify {root} --repair` un-commits the "
                         "damaged parts so that a rerun recomputes their params")
        else:
            lines.append("clean")
        print("\n".join(lines))
    return VerifyExit.DAMAGED if damage else VerifyExit.OK


def cmd_serve(args: argparse.Namespace) -> int:
    from tidegate.config import load_config
    from tidegate.service import run_service

    overrides = {key: getattr(args, key.replace(".", "__")) for _, key, _, _ in _SERVE_FLAGS}
    overrides["log.level"] = getattr(args, "log_level_given", None)  # --log-level, if given
    config = load_config(args.config, os.environ, overrides)
    setup_logging(config.log.level, config.log.format)
    return run_service(config)


def cmd_validate(args: argparse.Namespace) -> int:
    from tidegate.spec import check_callables, load_job
    from tidegate.writer import check_writable

    job = load_job(args.spec)
    check_callables(job)
    check_writable(job.output_dir, create=False)
    info = {
        "job_id": job.job_id,
        "params": job.n_params,
        "replicates": job.spec.replicates,
        "targets": len(job.spec.targets),
        "tasks": job.n_tasks,
        "output": str(job.output_dir),
    }
    search = job.spec.parameters.search
    if search is not None:  # its params are its trials, asked as the run goes
        info["search"] = {"trials": search.trials, "objective": search.objective,
                          "sampler": search.sampler, "space": list(search.space)}
    trial = _trial(job, args.trial) if args.trial else None
    if args.json:
        print(json.dumps(info if trial is None else {**info, "trial": trial.as_dict()}))
    else:
        count = f"params   {job.n_params}" if search is None else f"trials   {search.trials}"
        print(
            f"{args.spec}: ok\n"
            f"  job_id   {job.job_id}\n"
            f"  {count} x {job.spec.replicates} replicates, "
            f"{len(job.spec.targets)} targets\n"
            + (f"  search   {search.sampler} over {', '.join(search.space)}, objective "
               f"{search.objective}\n" if search is not None else "")
            + f"  tasks    {job.n_tasks}\n"
            f"  output   {job.output_dir}"
        )
        if trial is not None:
            print(trial.text())
    return RunExit.OK if trial is None or not trial.failed else RunExit.FAILURES


def _trial(job: Any, n: int, memory_limit: str | int | None = None) -> Any:
    """The trial run of --try / --limit; ClusterError exits 3 as a run's would."""
    from tidegate.cluster import ClusterError
    from tidegate.trial import run_trial

    quiet_dask_logs()
    try:
        return asyncio.run(run_trial(job, n, memory_limit=memory_limit))
    except ClusterError as exc:
        raise TrialClusterError(str(exc)) from None


class TrialClusterError(TidegateError):
    """The trial's local cluster did not start."""


def cmd_run(args: argparse.Namespace) -> int:
    from tidegate.cluster import ClusterOptions, parse_memory_limit
    from tidegate.knobs import controller_config, run_overrides
    from tidegate.runner import RunOptions
    from tidegate.spec import RUN_LIMITS, check_callables, load_job
    from tidegate.writer import check_not_nested, check_writable, foreign_entries

    if args.scheduler and any(
        v is not None for v in (args.workers, args.threads_per_worker, args.memory_limit)
    ):
        raise UsageError(
            "--workers, --threads-per-worker and --memory-limit size the embedded cluster; "
            "they cannot be combined with --scheduler"
        )
    memory_limit = None
    if args.memory_limit is not None:
        try:
            memory_limit = parse_memory_limit(args.memory_limit, field="--memory-limit")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    limits = dataclasses.replace(RUN_LIMITS, **{
        key: getattr(args, key) for key in ("max_params", "max_replicates", "max_tasks",
                                             "max_file_bytes")
        if getattr(args, key) is not None
    })
    job = load_job(args.spec, output=args.output, limits=limits)
    check_callables(job)
    if args.limit:
        # A trial writes to a scratch directory: the job's output is not touched, nor
        # checked (an output of another job or a foreign one is no reason to refuse).
        trial = _trial(job, args.limit, memory_limit)
        print(json.dumps(trial.as_dict()) if args.json else trial.text())
        return RunExit.OK if not trial.failed else RunExit.FAILURES
    # Before --force and --restart: neither may reach into another job's output.
    check_not_nested(job.output_dir)
    foreign = foreign_entries(job.output_dir)
    if foreign and not args.force:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(
            f"output: {job.output_dir} is not empty ({shown}) and holds no tidegate manifest "
            "or ledger; give the job an output of its own, or --force to write there "
            "(tidegate then removes only files named like its own parts)"
        )
    if args.restart and args.retry_failed:
        raise UsageError("--retry-failed and --restart cannot be combined: --restart "
                         "recomputes every param, the failed ones included")
    if args.restart and args.prune:
        raise UsageError("--prune and --restart cannot be combined: --restart discards "
                         "every committed param, the orphaned ones included; give one")
    options = RunOptions(
        batch_size=args.batch_size or pinned_batch_size(os.environ),
        controller=run_overrides(os.environ, {"memory_fraction": args.memory_fraction}),
        restart=args.restart,
        retry_failed=args.retry_failed,
        prune=args.prune,
        accept_code_change=args.accept_code_change,
        flush_params=args.flush_params,
        flush_seconds=args.flush_seconds,
    )
    try:
        controller_config(job, options)  # validate before any cluster starts
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Last of the checks: it creates the output directory, as the run would.
    check_writable(job.output_dir, create=True)
    args.no_workers_timeout = args.no_workers_timeout or no_workers_timeout(os.environ)
    cluster_options = ClusterOptions(
        address=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=memory_limit,
    )
    return asyncio.run(_run(job, cluster_options, options, args))


async def _run(job: Any, cluster_options: Any, options: Any, args: argparse.Namespace) -> int:
    from tidegate.cluster import ClusterError, WorkersLost, open_cluster
    from tidegate.metrics import Metrics
    from tidegate.progress import LogLines, TerminalBar
    from tidegate.runner import Runner

    quiet_dask_logs()
    try:
        cluster = await open_cluster(cluster_options)
    except ClusterError as exc:
        return fail(args, str(exc), RunExit.CLUSTER)
    progress: Any = None
    if not args.no_progress:
        progress = TerminalBar() if sys.stderr.isatty() else LogLines()
    metrics = Metrics(process=True)
    if args.metrics_port:
        try:
            metrics.serve(args.metrics_port)
        except OSError as exc:
            await cluster.close()
            raise UsageError(
                f"--metrics-port: cannot listen on {args.metrics_port}: {exc}"
            ) from None
    stopper = _Stopper()
    restore = _install_stop_handlers(stopper)
    restarts = 0
    message: str | None = None
    try:
        while True:
            # The code is hashed once per invocation: a resume after a restart of the
            # embedded cluster is the same run, whatever the model wrote meanwhile.
            code = stopper.runner.code if stopper.runner is not None else None
            runner = stopper.runner = Runner(
                job, cluster, options, progress=progress, metrics=metrics,
                no_workers_timeout_s=args.no_workers_timeout, code=code)
            if stopper.requested:  # a signal while the cluster restarted
                runner.stop()
            try:
                summary = await runner.run()
                break
            except WorkersLost as exc:
                assert runner.summary is not None
                summary = runner.summary
                if not cluster.embedded:
                    message = (f"{exc}; completed params are committed: rerun when workers "
                               "have joined the scheduler again, and the job resumes")
                    break
                if stopper.requested:
                    message = f"{exc}; stopped; a rerun resumes"
                    break
                if restarts >= CLUSTER_RESTARTS:
                    message = (f"{exc}, after {restarts} restarts of the embedded cluster; "
                               "completed params are committed and a rerun resumes. "
                               "If the model kills its workers, give them more memory "
                               "(--memory-limit) or fewer threads")
                    break
                # tidegate owns this cluster: replace it and resume from the ledger, as
                # the daemon does (Service._restart_cluster).
                restarts += 1
                log.warning("restarting the embedded cluster (%d of %d): %s; the job "
                            "resumes from its ledger", restarts, CLUSTER_RESTARTS, exc,
                            extra={"action": "cluster_restarted"})
                await cluster.close()
                # This run's output is now the job's own: never discard it again, and
                # its failures were retried already (those failing again stay failed).
                options = dataclasses.replace(options, restart=False, retry_failed=False)
                cluster = await open_cluster(cluster_options)
    except ClusterError as exc:
        return fail(args, str(exc), RunExit.CLUSTER)
    finally:
        if progress is not None:
            progress.clear()
        restore()
        await cluster.close()
    if message is not None and summary.error is None:
        summary.error = message
    if args.json:
        print(json.dumps(summary.as_dict()))
        if (retry_hint := _retry_hint(summary)) is not None:
            print(f"tidegate: {retry_hint}", file=sys.stderr)
    else:
        _print_summary(summary, hint=message is None)
    if message is not None and args.json:
        print(f"tidegate: error: {message}", file=sys.stderr)
    return summary.exit_code


def no_workers_timeout(env: Mapping[str, str]) -> float:
    """cluster.no_workers_timeout_s for `tidegate run`, as the daemon reads it."""
    name = "TIDEGATE_CLUSTER__NO_WORKERS_TIMEOUT_S"
    text = env.get(name, "").strip()
    if not text:
        return 30.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{name}: expected a number > 0, got {text!r}")
    return value


def pinned_batch_size(env: Mapping[str, str]) -> int | None:
    """B pinned by TIDEGATE_BATCH_SIZE, or MODELOPS_JOB_BATCH_SIZE for ModelOps users."""
    for name in ("TIDEGATE_BATCH_SIZE", "MODELOPS_JOB_BATCH_SIZE"):
        text = env.get(name, "").strip()
        if text:
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise UsageError(f"{name}: expected a whole number >= 1, got {text!r}")
            return value
    return None


@dataclasses.dataclass
class _Stopper:
    """The run a signal stops: the current Runner, replaced when the cluster restarts."""

    runner: Any = None
    requested: bool = False


def _install_stop_handlers(stopper: _Stopper) -> Callable[[], None]:
    """First SIGINT/SIGTERM: stop admitting, flush what completed, exit 130. Second: now."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopper.requested:
            # Committed parts are safe; the buffered ones a rerun recomputes.
            if os.isatty(2):  # the live bar hides the cursor; no exit handler shows it
                os.write(2, b"\x1b[?25h\n")
            os._exit(RunExit.INTERRUPTED)
        log.warning(
            "%s: stopping; completed params are flushed, a rerun resumes (again to quit now)",
            signal.Signals(signum).name, extra={"action": "stop_requested"},
        )
        stopper.requested = True
        if stopper.runner is not None:
            stopper.runner.stop()

    signums = (signal.SIGINT, signal.SIGTERM)
    for s in signums:
        loop.add_signal_handler(s, on_signal, s)

    def restore() -> None:
        for s in signums:
            loop.remove_signal_handler(s)

    return restore


def _retry_hint(s: Any) -> str | None:
    """What to do about a finished run's failed params, if it has any."""
    if s.failed and s.state in ("succeeded", "completed_with_failures") and not s.error:
        if getattr(s, "search", None):  # a search refuses --retry-failed
            return (f"{s.failed} trials failed (told to the search as failed); to search "
                    "on, raise parameters.search.trials and rerun")
        return (f"rerun with --retry-failed to run the {s.failed} failed params again "
                "(after fixing the model); the others stay as they are")
    return None


def _print_summary(s: Any, *, hint: bool = True) -> None:
    from tidegate.progress import search_text

    lines = [
        f"job {s.job_id}: {s.state} in {s.wall_seconds:.1f} s",
        f"  params   {s.ok} ok, {s.failed} failed of {s.total} ({s.resumed} from earlier runs"
        + (f", {s.retried} failed ones retried)" if s.retried else ")"),
        f"  batch    B {s.batch_min}..{s.batch_max}, final {s.batch_final}",
        f"  workers  {s.worker_restarts} lost, {s.oom_events} OOM events"
        + (f" ({', '.join(f'{n} {c}' for c, n in sorted(s.worker_losses.items()))})"
           if s.worker_losses else ""),
        f"  output   {s.output} ({s.parts} parts)",
    ]
    if getattr(s, "search", None):
        lines.insert(4, f"  search   {search_text(s.search)}")
    if s.pruned:
        lines.append(f"  pruned   {s.pruned} orphaned params (no longer in the spec) dropped "
                     "from every dataset")
    elif s.pruned is None and s.prune:
        lines.append("  pruned   none: the run did not finish, so its orphaned params are "
                     "not known; rerun with --prune to prune them")
    if s.orphaned:
        lines.append(f"  orphaned {s.orphaned} committed params no longer in the spec, kept "
                     "in the output, not in these counts (--prune drops them)")
        lines += [f"  orphan   {o['param_id']}: {o['values']}" for o in s.orphans]
    groups = getattr(s, "error_groups", None) or []
    for g in groups[:10]:
        lines.append(f"  failed   {g['count']} x {g['type']}: {g['message'][:200]}")
        for e in g["examples"]:
            values = ", ".join(f"{k}={v!r}" for k, v in e["values"].items())[:160]
            lines.append(f"             e.g. {e['param_id']} {{{values}}}")
    if len(groups) > 10:
        lines.append(f"  failed   ... and {len(groups) - 10} more kinds")
    if not groups:
        for e in s.errors[:5]:
            lines.append(f"  failed   {e['param_id']}: {e['error'].splitlines()[0][:200]}")
    if getattr(s, "tracebacks", None):
        lines.append(f"  tracebacks in {s.tracebacks}")
    if getattr(s, "reason", None):
        lines.append(f"tidegate: job stopped: {s.reason}")
    if (hint_text := _retry_hint(s)) is not None:
        lines.append(f"  {hint_text}")
    if s.error:
        lines.append(f"tidegate: error: {s.error}; free space and rerun to resume"
                     if s.state == "interrupted" and hint else f"tidegate: error: {s.error}")
    print("\n".join(lines), file=sys.stderr)
