"""``tidegate submit | status | jobs | cancel``: the command-line client of the daemon's
HTTP API (no Dask: it must start fast and run where Dask is not installed). Answers are
parsed into the API's own models (views.py).

Exit codes: :class:`tidegate.exitcodes.ClientExit`, listed in each command's ``--help``.
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tidegate.errors import TidegateError, error_json
from tidegate.exitcodes import ClientExit, epilog
from tidegate.report import Progress
from tidegate.states import TERMINAL, JobState
from tidegate.views import CancelAnswer, JobList, JobView, ParamCounts, Submitted

DEFAULT_URL = "http://127.0.0.1:8790"
POLL_S = 1.0  # how often `submit --wait` asks for the job
_SHOWN_ERRORS = 5

_sleep = time.sleep  # a seam for tests
_M = TypeVar("_M", bound=BaseModel)
STATES = tuple(JobState)


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

    def submit(self, spec_text: str, *, priority: int = 0,
               retry_failed: bool = False, prune: bool = False) -> Submitted:
        query = {"priority": str(priority)} if priority else {}
        if retry_failed:
            query["retry_failed"] = "true"
        if prune:
            query["prune"] = "true"
        answer = self._call("POST", "/v1/jobs", query, (spec_text.encode(), "application/yaml"))
        return self._parse(Submitted, answer, "POST /v1/jobs")

    def job(self, job_id: str) -> JobView:
        path = _job_path(job_id)
        return self._parse(JobView, self._call("GET", path), f"GET {path}")

    def jobs(self, state: str | None = None) -> list[JobView]:
        query = {"state": state} if state else None
        return self._parse(JobList, self._call("GET", "/v1/jobs", query), "GET /v1/jobs").jobs

    def cancel(self, job_id: str) -> CancelAnswer:
        path = _job_path(job_id)
        return self._parse(CancelAnswer, self._call("DELETE", path), f"DELETE {path}")

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
        on_update: Callable[[JobView], None] | None = None,
        poll_s: float = 1.0,
    ) -> JobView:
        """Poll the job until it is succeeded, failed or cancelled. An interrupted job is
        waited for too: the daemon resumes it when it is back."""
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job.state in TERMINAL:
                return job
            _sleep(poll_s)

    def _parse(self, model: type[_M], answer: Any, what: str) -> _M:
        try:
            return model.model_validate(answer)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "<top level>"
            raise DaemonUnreachable(
                f"{self.url} answered {what} with JSON that is not the tidegate API's "
                f"({where}: {first['msg']}); is it a tidegate daemon of this version?"
            ) from None

    def _call(self, method: str, path: str, query: Mapping[str, str] | None = None,
              body: tuple[bytes, str] | None = None) -> Any:
        """The decoded JSON answer; ``body`` is (data, content type)."""
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = body
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
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


def as_view(job: JobView | Mapping[str, Any]) -> JobView:
    """A job as the API's model, from the model or from its JSON."""
    return job if isinstance(job, JobView) else JobView.model_validate(job)


def exit_code_for(job: JobView | Mapping[str, Any]) -> ClientExit:
    """As `tidegate run`: 0 if the job succeeded with no failed params, 4 if it
    completed with failures, else 1."""
    view = as_view(job)
    if view.state == JobState.SUCCEEDED and not view.params.failed:
        return ClientExit.OK
    if view.state in (JobState.SUCCEEDED, JobState.COMPLETED_WITH_FAILURES):
        return ClientExit.FAILURES
    return ClientExit.FAILED


def progress_of(job: JobView | Mapping[str, Any], now: float) -> Progress:
    """A Progress snapshot from a job. The rate is the daemon's when it sends one, else
    this run's params (not the resumed ones) over the time since it started."""
    view = as_view(job)
    params = view.params
    started = view.started_at
    elapsed = max(0.0, now - started) if started is not None else 0.0
    done = params.ok + params.failed
    rate = view.rate  # the daemon's own, while it runs the job
    if rate is None:
        rate = (done - params.resumed) / elapsed if elapsed > 0 and done > params.resumed else 0.0
    return Progress(
        job_id=view.id,
        total=params.total or 0,
        done=done,
        ok=params.ok,
        failed=params.failed,
        resumed=params.resumed,
        batch_size=view.batch_size or 0,
        inflight_params=view.inflight.params,
        inflight_tasks=view.inflight.tasks,
        rate=rate,
        elapsed=elapsed,
        oom_events=view.oom_events,
        quarantined=params.quarantined,
        worker_restarts=view.worker_restarts,
        retried=params.retried,
        search=view.search.model_dump(mode="json") if view.search is not None else None,
    )


def _total(params: ParamCounts) -> str:
    return "?" if params.total is None else str(params.total)  # None until it is expanded


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe_job(job: JobView) -> str:
    """A few lines for a human: state, params, B, in flight, workers, output, errors."""
    params, inflight = job.params, job.inflight
    quarantined = params.quarantined
    lines = [
        f"job {job.id}: {job.state} (priority {job.priority})",
        f"  params    {params.ok} ok, {params.failed} failed of "
        f"{_total(params)} ({params.resumed} from earlier runs"
        + (f", {quarantined} quarantined" if quarantined else "")
        + (f", {params.retried} retried" if params.retried else "")
        + (f", {params.pruned} orphaned pruned)" if params.pruned else ")"),
        f"  batch     B={job.batch_size or '-'}, in flight "
        f"{inflight.params} params / {inflight.tasks} tasks",
        f"  workers   {job.worker_restarts} lost, {job.oom_events} OOM events",
        f"  times     submitted {_when(job.submitted_at)}, started "
        f"{_when(job.started_at)}, finished {_when(job.finished_at)}",
        f"  output    {job.output or '-'}",
    ]
    if job.search is not None:
        from tidegate.progress import search_text

        lines.insert(4, f"  search    {search_text(job.search.model_dump(mode='json'))}")
    if job.error:
        lines.append(f"  error     {job.error}")
    for e in job.errors[:_SHOWN_ERRORS]:
        first = e.error.splitlines()[0][:200] if e.error else ""
        lines.append(f"  failed    {e.param_id}: {first}")
    if len(job.errors) > _SHOWN_ERRORS:
        lines.append(f"  ...       and {len(job.errors) - _SHOWN_ERRORS} more failed params")
    return "\n".join(lines)


# --- the commands -------------------------------------------------------------------------


def _priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--priority: expected a whole number, got {text!r}"
        ) from None


def add_client_commands(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add submit, status, jobs and cancel to a parser's subcommands; each sets
    ``handler=run_client_command``. ``parents``: options every command takes."""
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, epilog=epilog(name),
                                  parents=list(parents),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
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
    submit.add_argument("--retry-failed", action="store_true",
                        help="run again the params this job's output records as failed or "
                        "quarantined (after a fix of the model); the rest stay as they are")
    submit.add_argument("--prune", action="store_true",
                        help="once the job's run has walked the whole spec, drop from its "
                        "output the committed params the spec no longer has (orphaned)")
    submit.add_argument("--json", action="store_true",
                        help="print the daemon's answer (with --wait: the final job) as JSON")

    status = add("status", "the daemon's readiness and job counts, or one job")
    status.add_argument("job_id", nargs="?", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print JSON")

    jobs = add("jobs", "list the daemon's jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in STATES],
                      help="only jobs in this state")
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
        return _fail(args, str(exc), ClientExit.USAGE)
    try:
        return _COMMANDS[args.client_command](client, args)
    except ApiError as exc:
        if exc.status == http.HTTPStatus.UNAUTHORIZED:
            return _fail(args, _unauthorized(url, exc), ClientExit.USAGE)
        return _fail(args, str(exc),
                     ClientExit.DAEMON if exc.status >= 500 else ClientExit.USAGE)
    except DaemonUnreachable as exc:
        return _fail(args, str(exc), ClientExit.DAEMON)
    except KeyboardInterrupt:
        return ClientExit.INTERRUPTED


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """On stderr, and under --json also as a JSON object on stdout."""
    print(f"tidegate: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(error_json(message, code))
    return code


def _unauthorized(url: str, exc: ApiError) -> str:
    if os.environ.get("TIDEGATE_TOKEN"):
        return f"the daemon at {url} refused the token in TIDEGATE_TOKEN ({exc})"
    return f"the daemon at {url} requires an API token: set TIDEGATE_TOKEN ({exc})"


def _print_json(data: BaseModel | dict[str, Any]) -> None:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
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
        return _fail(args, f"cannot read job spec {args.spec}: {exc}", ClientExit.USAGE)
    answer = client.submit(with_absolute_paths(text, args.spec.parent), priority=args.priority,
                           retry_failed=args.retry_failed, prune=args.prune)
    job_id = answer.id
    if not args.wait:
        if args.json:
            _print_json(answer)
        else:
            print(f"submitted job {job_id}: {answer.state}")
        return ClientExit.OK
    print(f"tidegate: submitted job {job_id}; waiting for it (Ctrl-C stops waiting, "
          "not the job)", file=sys.stderr)
    try:
        job = _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"tidegate: stopped waiting; job {job_id} goes on in the daemon "
              f"(`tidegate status {job_id}`, `tidegate cancel {job_id}`)", file=sys.stderr)
        return ClientExit.INTERRUPTED
    except DaemonUnreachable as exc:
        return _fail(args, f"{exc}\n  job {job_id} was submitted; check it with "
                     f"`tidegate status {job_id}`", ClientExit.DAEMON)
    print(describe_job(job), file=sys.stderr)
    if args.json:
        _print_json(job)
    return exit_code_for(job)


def _follow(client: Client, job_id: str) -> JobView:
    follower = _Follower(job_id)
    try:
        return client.wait(job_id, on_update=follower, poll_s=POLL_S)
    finally:
        follower.sink.clear()


_STATE_NOTES = {
    JobState.INTERRUPTED: " (the daemon stopped mid-job; it resumes when the daemon is back)",
}


class _Follower:
    """Shows a waited-for job: a line per state change, progress while it runs."""

    def __init__(self, job_id: str):
        from tidegate.progress import LogLines, TerminalBar

        self.job_id = job_id
        self.state: JobState | None = None
        self.sink = TerminalBar() if sys.stderr.isatty() else LogLines()

    def __call__(self, job: JobView) -> None:
        state = job.state
        if state != self.state:
            self.sink.clear()
            print(f"tidegate: job {self.job_id}: {state}{_STATE_NOTES.get(state, '')}",
                  file=sys.stderr)
            self.state = state
        if job.started_at is not None and job.params.total:
            self.sink.update(progress_of(job, time.time()))


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    if args.job_id:
        job = client.job(args.job_id)
        if args.json:
            _print_json(job)
        else:
            print(describe_job(job))
        return ClientExit.OK
    ready, detail = client.readiness()
    counts = dict.fromkeys(STATES, 0)
    for job in client.jobs():
        counts[job.state] += 1
    if args.json:
        _print_json({"url": client.url, "ready": ready, "readyz": detail, "counts": counts})
    else:
        print(f"daemon {client.url}: {'ready' if ready else 'not ready'}"
              + ("" if ready else f": {_why_not_ready(detail)}"))
        print("jobs    " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return ClientExit.OK if ready else ClientExit.DAEMON


def _why_not_ready(detail: Mapping[str, Any]) -> str:
    """The /readyz body's reason: its error, or the checks that failed."""
    if detail.get("error"):
        return str(detail["error"])
    failing = [k for k, v in detail.items() if v is False and k != "ready"]
    return f"{', '.join(failing)} not ok" if failing else "see /readyz"


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs(args.state)
    if args.json:
        _print_json(JobList(jobs=jobs))
        return ClientExit.OK
    if not jobs:
        print(f"no {args.state} jobs" if args.state else "no jobs")
        return ClientExit.OK
    rows = [("ID", "STATE", "PRIORITY", "PARAMS", "SUBMITTED")]
    for job in jobs:
        p = job.params
        done = f"{p.ok + p.failed}/{_total(p)}"
        if p.failed:
            done += f" ({p.failed} failed)"
        rows.append((job.id, job.state, str(job.priority), done, _when(job.submitted_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return ClientExit.OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    answer = client.cancel(args.job_id)
    if args.json:
        _print_json(answer)
        return ClientExit.OK
    job_id, state = answer.id, answer.state
    if state == JobState.CANCELLED:
        print(f"job {job_id}: cancelled")
    elif state in TERMINAL:
        print(f"job {job_id}: already {state}; nothing to cancel")
    elif state in ("cancelling", JobState.RUNNING):
        print(f"job {job_id}: cancelling; it stops after writing the params that have "
              "completed")
    else:
        print(f"job {job_id}: {state}")
    return ClientExit.OK


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": cmd_submit,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "cancel": cmd_cancel,
}
