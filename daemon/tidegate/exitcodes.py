"""Exit codes, one enum per family of commands, since a number means one thing per
family (3: the cluster for ``run``, start-up for ``serve``, the daemon for the client).

The per-command tables in ``--help`` and in the docs (README.md, docs/operations.md,
between ``<!-- exit-codes -->`` markers) are rendered from here; a unit test keeps the
docs in step: regenerate with ``python -m tidegate.exitcodes``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Self


class ExitCode(IntEnum):
    """An exit status and what it means (``meaning``)."""

    meaning: str

    def __new__(cls, value: int, meaning: str = "") -> Self:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member


class RunExit(ExitCode):
    """``tidegate run`` (and ``validate``, ``schema``)."""

    OK = 0, "success (`run`: every param ok)"
    FAILED = 1, ("the job failed: stopped by `on_error` (its circuit breaker) or by a "
                 "model's contract error, or its output could not be written")
    USAGE = 2, ("bad input (the message names the field, what was expected and what came), "
                "or an output whose committed parts are damaged or whose ledger is lost "
                "(see `tidegate verify`)")
    CLUSTER = 3, "the cluster could not be reached or started"
    FAILURES = 4, ("the job completed with failures: every param ran, some failed "
                   "(`completed_with_failures`; see `tidegate failures OUTPUT_DIR`)")
    INTERRUPTED = 130, ("interrupted by Ctrl-C or SIGTERM, the output's disk is full, or "
                        "the cluster has no workers (`--scheduler`, or the embedded one "
                        "after 3 restarts) (committed params stay; a rerun resumes)")


class VerifyExit(ExitCode):
    """``tidegate verify``."""

    OK = 0, "clean (`--repair`: nothing is left damaged)"
    DAMAGED = 1, ("damage found: a committed part is missing, truncated, changed, unreadable "
                  "or a symbolic link, or params rows name a part the ledger does not record")
    USAGE = 2, ("bad input: not a directory, not a tidegate output, or an unreadable ledger; "
                "`--repair` also: a run holds the output, a symbolic link in it, or a lost "
                "ledger without a manifest naming the job")


class ServeExit(ExitCode):
    """``tidegate serve``, the daemon."""

    OK = 0, "drained and stopped after SIGTERM or SIGINT"
    FORCED = 1, "a second SIGTERM or SIGINT stopped it at once (committed parts are safe)"
    CONFIG = 2, "bad config (the message names the key, what was expected and what came)"
    STARTUP = 3, ("start-up failure: cannot listen, unusable state_dir, the embedded "
                  "cluster did not start, or no token beyond loopback")


class ClientExit(ExitCode):
    """``tidegate submit | status | jobs | cancel``, the daemon's client."""

    OK = 0, "ok"
    FAILED = 1, "`submit --wait`: the job failed or was cancelled"
    USAGE = 2, ("bad input: the daemon answered 400, 401, 403, 404, 409 or 413, or the "
                "spec file is unreadable")
    DAEMON = 3, "the daemon is unreachable, answered 5xx, or (`status`) is not ready"
    FAILURES = 4, "`submit --wait`: the job completed with failures (some params failed)"
    INTERRUPTED = 130, "Ctrl-C (`submit --wait` stops waiting, not the job)"


_ASKING = (ClientExit.OK, ClientExit.USAGE, ClientExit.DAEMON, ClientExit.INTERRUPTED)
_READING = (RunExit.OK, RunExit.USAGE)

# The codes each command can exit with, in the order the tables show them.
COMMANDS: dict[str, tuple[ExitCode, ...]] = {
    "run": tuple(RunExit),
    "validate": (RunExit.OK, RunExit.USAGE),
    "schema": (RunExit.OK, RunExit.USAGE),
    "verify": tuple(VerifyExit),
    "failures": _READING,
    "best": _READING,
    "serve": tuple(ServeExit),
    "submit": tuple(ClientExit),
    "status": _ASKING,
    "jobs": _ASKING,
    "cancel": _ASKING,
}


def epilog(command: str) -> str:
    """The exit-code table of one command, for its ``--help``."""
    codes = COMMANDS[command]
    width = max(len(str(int(c))) for c in codes)
    rows = [f"  {int(c):>{width}}  {c.meaning.replace('`', '')}" for c in codes]
    return "\n".join(["exit codes:", *rows])


def markdown_table() -> str:
    """Every command's exit codes as one Markdown table; commands that share their codes
    share a row group."""
    # Keyed by enum too: RunExit.CLUSTER == ClientExit.DAEMON, as ints.
    groups: dict[tuple[tuple[str, int], ...], tuple[tuple[ExitCode, ...], list[str]]] = {}
    for command, codes in COMMANDS.items():
        key = tuple((type(c).__name__, int(c)) for c in codes)
        groups.setdefault(key, (codes, []))[1].append(command)
    lines = ["| command | code | meaning |", "|---|---|---|"]
    for codes, commands in groups.values():
        names = ", ".join(f"`{c}`" for c in commands)
        for i, code in enumerate(codes):
            lines.append(f"| {names if i == 0 else ''} | {int(code)} | {code.meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
