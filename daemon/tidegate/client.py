"""``tidegate submit | status | jobs | cancel``: the command-line client of the daemon's
HTTP API (stdlib only: it must start fast and run where Dask is not installed).

Exit codes: 0 ok; 1 the job failed, was cancelled or has failed params (``submit
--wait``); 2 bad input (the daemon answered 400/401/403/404/409/413, or the spec file is
unreadable); 3 daemon unreachable or answering 5xx; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import http
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tidegate.errors import TidegateError
from tidegate.jobqueue import STATES, TERMINAL
from tidegate.report import Progress

DEFAULT_URL = "http://127.0.0.1:8790"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DAEMON, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
POLL_S = 1.0  # how often `submit --wait` asks for the job
_SHOWN_ERRORS = 5

_sleep = time.sleep  # a seam for tests


class ApiError(TidegateError):
    """The daemon answered with an error status."""

    def __init__(
        self,
        status: int,
        message: str,
        errors: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None,
    ):
        self.status = status
        self.message = message
        self.errors = list(errors or [])
        self.body = body or {}  # the whole JSON answer, when there was one
        super().__init__(status, message, self.errors)

    def __str__(self) -> str:
        head = f"{self.message} (HTTP {self.status})"
        if not self.errors or (len(self.errors) == 1
                               and _field_error(self.errors[0]) in self.message):
            return head  # a lone field error the message already states
        return "\n".join([f"{head}:", *(f"  - {_field_error(e)}" for e in self.errors)])


class DaemonUnreachable(TidegateError):
    """No answer from the daemon (not running, wrong URL, network, timeout), or an answer
    that is not the API's JSON."""


def _field_error(error: Any) -> str:
    if not isinstance(error, Mapping):
        return str(error)
    field = error.get("field", "?")
    if "expected" in error:
        return f"{field}: expected {error['expected']}, got {error.get('got', '?')}"
    detail = error.get("error") or error.get("got")
    return f"{field}: {detail}" if detail else str(field)


class Client:
    """The daemon's HTTP API, one method per endpoint."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"daemon URL: expected http://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def submit(self, spec_text: str, *, priority: int = 0) -> dict[str, Any]:
        query = {"priority": str(priority)} if priority else None
        return self._call("POST", "/v1/jobs", query=query, body=spec_text.encode(),
                          content_type="application/yaml")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", _job_path(job_id))

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        query = {"state": state} if state else None
        return list(self._call("GET", "/v1/jobs", query=query)["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", _job_path(job_id))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, /readyz body); a 503 is an answer here, not an error."""
        try:
            return True, self._call("GET", "/readyz")
        except ApiError as exc:
            if exc.status != http.HTTPStatus.SERVICE_UNAVAILABLE:
                raise
            return False, exc.body or {"error": exc.message}

    def wait(
        self,
        job_id: str,
        *,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
    ) -> dict[str, Any]:
        """Poll the job until it is succeeded, failed or cancelled. An interrupted job is
        waited for too: the daemon resumes it when it is back."""
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job.get("state") in TERMINAL:
                return job
            _sleep(poll_s)

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:  # an answer, with an error status
            try:
                raw = exc.read()
            finally:
                exc.close()
            raise _api_error(exc.code, raw) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DaemonUnreachable(
                f"cannot reach the tidegate daemon at {self.url}: {reason}"
            ) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise DaemonUnreachable(
                f"{self.url} answered {method} {path} with {status} but not JSON "
                f"({raw[:60]!r}); is it a tidegate daemon?"
            ) from None


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}"


def _api_error(status: int, raw: bytes) -> ApiError:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        text = raw.decode(errors="replace").strip()[:200]
        return ApiError(status, text or _phrase(status))
    errors = payload.get("errors")
    return ApiError(status, str(payload.get("error") or _phrase(status)),
                    errors if isinstance(errors, list) else [], payload)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "error"


# --- what a job dict means --------------------------------------------------------------


def exit_code_for(job: Mapping[str, Any]) -> int:
    """As `tidegate run`: 0 if the job succeeded with no failed params, else 1."""
    failed = (job.get("params") or {}).get("failed", 0)
    return EXIT_OK if job.get("state") == "succeeded" and not failed else EXIT_FAILED


def progress_of(job: Mapping[str, Any], now: float) -> Progress:
    """A Progress snapshot from a job dict. The rate is the daemon's when it sends one,
    else this run's params (not the resumed ones) over the time since it started."""
    params = job.get("params") or {}
    ok, failed, resumed = (int(params.get(k) or 0) for k in ("ok", "failed", "resumed"))
    inflight = job.get("inflight") or {}
    started = job.get("started_at")
    elapsed = max(0.0, now - started) if started is not None else 0.0
    done = ok + failed
    rate = job.get("rate")  # the daemon's own, while it runs the job
    if not isinstance(rate, int | float):
        rate = (done - resumed) / elapsed if elapsed > 0 and done > resumed else 0.0
    return Progress(
        job_id=str(job.get("id")),
        total=int(params.get("total") or 0),
        done=done,
        ok=ok,
        failed=failed,
        resumed=resumed,
        batch_size=int(job.get("batch_size") or 0),
        inflight_params=int(inflight.get("params") or 0),
        inflight_tasks=int(inflight.get("tasks") or 0),
        rate=float(rate),
        elapsed=elapsed,
        oom_events=int(job.get("oom_events") or 0),
    )


def _total(params: Mapping[str, Any]) -> str:
    total = params.get("total")
    return "?" if total is None else str(total)  # None until the daemon expands the spec


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe_job(job: Mapping[str, Any]) -> str:
    """A few lines for a human: state, params, B, in flight, workers, output, errors."""
    params = job.get("params") or {}
    inflight = job.get("inflight") or {}
    quarantined = params.get("quarantined") or 0
    lines = [
        f"job {job.get('id')}: {job.get('state')} (priority {job.get('priority', 0)})",
        f"  params    {params.get('ok', 0)} ok, {params.get('failed', 0)} failed of "
        f"{_total(params)} ({params.get('resumed', 0)} from earlier runs"
        + (f", {quarantined} quarantined)" if quarantined else ")"),
        f"  batch     B={job.get('batch_size') or '-'}, in flight "
        f"{inflight.get('params', 0)} params / {inflight.get('tasks', 0)} tasks",
        f"  workers   {job.get('worker_restarts', 0)} lost, "
        f"{job.get('oom_events', 0)} OOM events",
        f"  times     submitted {_when(job.get('submitted_at'))}, started "
        f"{_when(job.get('started_at'))}, finished {_when(job.get('finished_at'))}",
        f"  output    {job.get('output', '-')}",
    ]
    if job.get("error"):
        lines.append(f"  error     {job['error']}")
    errors = job.get("errors") or []
    for e in errors[:_SHOWN_ERRORS]:
        first = str(e.get("error", "")).splitlines()[0][:200] if e.get("error") else ""
        lines.append(f"  failed    {e.get('param_id')}: {first}")
    if len(errors) > _SHOWN_ERRORS:
        lines.append(f"  ...       and {len(errors) - _SHOWN_ERRORS} more failed params")
    return "\n".join(lines)


# --- the commands -------------------------------------------------------------------------


def _priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--priority: expected a whole number, got {text!r}"
        ) from None


def add_client_commands(subparsers: Any) -> None:
    """Add submit, status, jobs and cancel to a parser's subcommands; each sets
    ``handler=run_client_command``."""
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text)
        p.add_argument("--url", help=f"the daemon (default: $TIDEGATE_URL or {DEFAULT_URL}); "
                       "the API token is read from $TIDEGATE_TOKEN")
        p.set_defaults(handler=run_client_command, client_command=name)
        return p

    submit = add("submit", "submit a job spec to the daemon")
    submit.add_argument("spec", type=Path, help="job spec (YAML)")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job to its end; exit as `tidegate run` would")
    submit.add_argument("--priority", type=_priority, default=0, metavar="N",
                        help="higher runs sooner (default 0)")
    submit.add_argument("--json", action="store_true",
                        help="print the daemon's answer (with --wait: the final job) as JSON")

    status = add("status", "the daemon's readiness and job counts, or one job")
    status.add_argument("job_id", nargs="?", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print JSON")

    jobs = add("jobs", "list the daemon's jobs, newest first")
    jobs.add_argument("--state", choices=STATES, help="only jobs in this state")
    jobs.add_argument("--json", action="store_true", help="print JSON")

    cancel = add("cancel", "cancel a queued or running job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")


def run_client_command(args: argparse.Namespace) -> int:
    """Run one client command; messages go to stderr as 'tidegate: error: ...'."""
    url = args.url or os.environ.get("TIDEGATE_URL") or DEFAULT_URL
    try:
        client = Client(url, os.environ.get("TIDEGATE_TOKEN") or None)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        return _COMMANDS[args.client_command](client, args)
    except ApiError as exc:
        if exc.status == http.HTTPStatus.UNAUTHORIZED:
            return _fail(_unauthorized(url, exc), EXIT_USAGE)
        return _fail(str(exc), EXIT_DAEMON if exc.status >= 500 else EXIT_USAGE)
    except DaemonUnreachable as exc:
        return _fail(str(exc), EXIT_DAEMON)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(message: str, code: int) -> int:
    print(f"tidegate: error: {message}", file=sys.stderr)
    return code


def _unauthorized(url: str, exc: ApiError) -> str:
    if os.environ.get("TIDEGATE_TOKEN"):
        return f"the daemon at {url} refused the token in TIDEGATE_TOKEN ({exc})"
    return f"the daemon at {url} requires an API token: set TIDEGATE_TOKEN ({exc})"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def with_absolute_paths(text: str, spec_dir: Path) -> str:
    """The spec with its file paths made absolute, as the spec file means them.

    In a spec file, `code_paths` and `parameters.file` are relative to the file; the
    daemon never sees the file, so they are resolved here (the daemon still checks
    code paths against its code_roots). `output` stays relative: to the daemon's
    output_root. Text that does not parse is sent as it is, for the daemon to report.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(data, dict):
        return text
    base = spec_dir.resolve()
    # Only paths the spec names: a daemon adds none (jobs without code_paths use
    # modules installed beside it), where `tidegate run` defaults to the spec's folder.
    paths = data.get("code_paths")
    if isinstance(paths, list):
        data["code_paths"] = [str(base / p) if isinstance(p, str) else p for p in paths]
    params = data.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("file"), str):
        params["file"] = str(base / params["file"])
    return json.dumps(data)


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    try:
        text = args.spec.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"cannot read job spec {args.spec}: {exc}", EXIT_USAGE)
    answer = client.submit(with_absolute_paths(text, args.spec.parent), priority=args.priority)
    job_id = answer["id"]
    if not args.wait:
        if args.json:
            _print_json(answer)
        else:
            print(f"submitted job {job_id}: {answer.get('state', 'queued')}")
        return EXIT_OK
    print(f"tidegate: submitted job {job_id}; waiting for it (Ctrl-C stops waiting, "
          "not the job)", file=sys.stderr)
    try:
        job = _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"tidegate: stopped waiting; job {job_id} goes on in the daemon "
              f"(`tidegate status {job_id}`, `tidegate cancel {job_id}`)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DaemonUnreachable as exc:
        return _fail(f"{exc}\n  job {job_id} was submitted; check it with "
                     f"`tidegate status {job_id}`", EXIT_DAEMON)
    print(describe_job(job), file=sys.stderr)
    if args.json:
        _print_json(job)
    return exit_code_for(job)


def _follow(client: Client, job_id: str) -> dict[str, Any]:
    follower = _Follower(job_id)
    try:
        return client.wait(job_id, on_update=follower, poll_s=POLL_S)
    finally:
        follower.sink.clear()


_STATE_NOTES = {"interrupted": " (the daemon stopped mid-job; it resumes when the daemon is back)"}


class _Follower:
    """Shows a waited-for job: a line per state change, progress while it runs."""

    def __init__(self, job_id: str):
        from tidegate.progress import LogLines, TerminalBar

        self.job_id = job_id
        self.state: str | None = None
        self.sink = TerminalBar(stream=sys.stderr) if sys.stderr.isatty() else LogLines()

    def __call__(self, job: dict[str, Any]) -> None:
        state = job.get("state")
        if state != self.state:
            self.sink.clear()
            print(f"tidegate: job {self.job_id}: {state}{_STATE_NOTES.get(state, '')}",
                  file=sys.stderr)
            self.state = state
        if job.get("started_at") is not None and (job.get("params") or {}).get("total"):
            self.sink.update(progress_of(job, time.time()))


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    if args.job_id:
        job = client.job(args.job_id)
        if args.json:
            _print_json(job)
        else:
            print(describe_job(job))
        return EXIT_OK
    ready, detail = client.readiness()
    counts = dict.fromkeys(STATES, 0)
    for job in client.jobs():
        counts[job.get("state")] = counts.get(job.get("state"), 0) + 1
    if args.json:
        _print_json({"url": client.url, "ready": ready, "readyz": detail, "counts": counts})
    else:
        print(f"daemon {client.url}: {'ready' if ready else 'not ready'}"
              + ("" if ready else f": {_why_not_ready(detail)}"))
        print("jobs    " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return EXIT_OK if ready else EXIT_DAEMON


def _why_not_ready(detail: Mapping[str, Any]) -> str:
    """The /readyz body's reason: its error, or the checks that failed."""
    if detail.get("error"):
        return str(detail["error"])
    failing = [k for k, v in detail.items() if v is False and k != "ready"]
    return f"{', '.join(failing)} not ok" if failing else "see /readyz"


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs(args.state)
    if args.json:
        _print_json({"jobs": jobs})
        return EXIT_OK
    if not jobs:
        print(f"no {args.state} jobs" if args.state else "no jobs")
        return EXIT_OK
    rows = [("ID", "STATE", "PRIORITY", "PARAMS", "SUBMITTED")]
    for job in jobs:
        p = job.get("params") or {}
        done = f"{(p.get('ok') or 0) + (p.get('failed') or 0)}/{_total(p)}"
        if p.get("failed"):
            done += f" ({p['failed']} failed)"
        rows.append((str(job.get("id")), str(job.get("state")), str(job.get("priority", 0)),
                     done, _when(job.get("submitted_at"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    answer = client.cancel(args.job_id)
    if args.json:
        _print_json(answer)
        return EXIT_OK
    job_id, state = answer.get("id"), answer.get("state")
    if state == "cancelled":
        print(f"job {job_id}: cancelled")
    elif state in TERMINAL:
        print(f"job {job_id}: already {state}; nothing to cancel")
    elif state in ("cancelling", "running"):
        print(f"job {job_id}: cancelling; it stops after writing the params that have "
              "completed")
    else:
        print(f"job {job_id}: {state}")
    return EXIT_OK


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "cancel": cmd_cancel,
}
