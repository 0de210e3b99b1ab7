"""The daemon's command-line client against a small fake daemon: a real HTTP server in a
thread that keeps jobs and answers the API's shapes (the real daemon is tested elsewhere).
A waited-for job moves one step each time the client asks for it, so nothing sleeps."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.text import Text

from tidegate import client as client_module
from tidegate.client import (
    ApiError,
    Client,
    DaemonUnreachable,
    add_client_commands,
    exit_code_for,
    progress_of,
)

TOKEN = "s3cret"
T0 = 1_700_000_000.0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


def job_dict(job_id: str, state: str, ok: int = 0, failed: int = 0, total: int = 4,
             **extra: Any) -> dict[str, Any]:
    """A job as the API returns it."""
    running = state == "running"
    job = {
        "id": job_id, "url": f"/v1/jobs/{job_id}", "state": state, "priority": 0,
        "cancel_requested": False, "submitted_at": T0,
        "started_at": None if state == "queued" else T0 + 1,
        "finished_at": T0 + 9 if state in ("succeeded", "failed", "cancelled") else None,
        # As the daemon: the total is unknown (null) until the job has started.
        "params": {"total": None if state == "queued" else total, "ok": ok, "failed": failed,
                   "resumed": 0, "quarantined": 0},
        "batch_size": 2 if running else None,
        "inflight": {"params": 2 if running else 0, "tasks": 6 if running else 0},
        "oom_events": 1, "worker_restarts": 1, "output": f"/srv/tidegate/out/{job_id}",
        "errors": [{"param_id": f"p{i}", "error": f"ValueError: bad {i}\n  trace"}
                   for i in range(failed)],
        "summary": None, "error": None,
    }
    job.update(extra)
    return job


# What a submitted job goes through, one step per GET of it; "hangup" drops the connection.
TO_SUCCESS = [("queued", 0, 0), ("running", 1, 0), ("interrupted", 1, 0), ("running", 3, 0),
              ("succeeded", 4, 0)]


@dataclass
class FakeDaemon:
    token: str | None = None
    max_body: int = 4096
    ready: bool = True
    plan: list[Any] = field(default_factory=lambda: list(TO_SUCCESS))
    forced: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: dict[str, list[Any]] = field(default_factory=dict)
    url: str = ""

    def handle(self, r: Request) -> tuple[int, Any]:
        self.requests.append(r)
        if (r.method, r.path) in self.forced:
            return self.forced[(r.method, r.path)]
        if r.path == "/readyz":
            return (200 if self.ready else 503), {
                "ready": self.ready, "scheduler": self.ready, "store": True}
        if self.token and r.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "a valid bearer token is required"}
        if r.path == "/v1/jobs" and r.method == "POST":
            return self.submit(r)
        if r.path == "/v1/jobs" and r.method == "GET":
            state = r.query.get("state", [None])[0]
            jobs = [j for j in reversed(self.jobs.values()) if state in (None, j["state"])]
            return 200, {"jobs": jobs}
        job_id = urllib.parse.unquote(r.path.removeprefix("/v1/jobs/"))
        if job_id not in self.jobs:
            return 404, {"error": f"no job {job_id!r}"}
        if r.method == "DELETE":
            return self.cancel(job_id)
        return self.get(job_id)

    def submit(self, r: Request) -> tuple[int, Any]:
        if len(r.body) > self.max_body:
            return 413, {"error": f"job spec is larger than {self.max_body} bytes"}
        spec = yaml.safe_load(r.body)
        errors = []
        if "model" not in spec:
            errors.append({"field": "model", "expected": "a callable reference "
                           "'module:function'", "got": "nothing"})
        if not isinstance(spec.get("replicates", 1), int) or spec.get("replicates", 1) < 1:
            errors.append({"field": "replicates", "expected": "a whole number >= 1",
                           "got": repr(spec["replicates"])})
        if errors:
            return 400, {"error": "job spec is not valid", "errors": errors}
        job_id = spec["job_id"]
        if job_id in self.jobs and self.jobs[job_id]["state"] in ("queued", "running"):
            return 409, {"error": f"job {job_id!r} is already {self.jobs[job_id]['state']}"}
        priority = int(r.query.get("priority", ["0"])[0])
        self.jobs[job_id] = job_dict(job_id, "queued", priority=priority)
        self.steps[job_id] = list(self.plan)
        return 201, {"id": job_id, "url": f"/v1/jobs/{job_id}", "state": "queued"}

    def get(self, job_id: str) -> tuple[int, Any]:
        steps = self.steps.get(job_id)
        if steps:
            step = steps.pop(0) if len(steps) > 1 else steps[0]
            if step == "hangup":
                return 0, None
            state, ok, failed = step
            self.jobs[job_id] = job_dict(job_id, state, ok, failed,
                                         priority=self.jobs[job_id]["priority"])
        return 200, self.jobs[job_id]

    def cancel(self, job_id: str) -> tuple[int, Any]:
        job = self.jobs[job_id]
        if job["state"] in ("queued", "interrupted"):
            job["state"] = "cancelled"
        self.steps.pop(job_id, None)
        return 202, {"id": job_id, "state": "cancelling" if job["state"] == "running"
                     else job["state"]}


def _handler(daemon: FakeDaemon) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = Request(self.command, parts.path, urllib.parse.parse_qs(parts.query),
                              {k.lower(): v for k, v in self.headers.items()}, body)
            status, payload = daemon.handle(request)
            if status == 0:  # hang up without answering
                self.close_connection = True
                return
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            return None

    return Handler


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    fake = FakeDaemon()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    # A short poll interval only so that shutdown() returns quickly at teardown.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              name="fake-daemon", daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIDEGATE_TOKEN", raising=False)
    monkeypatch.delenv("TIDEGATE_URL", raising=False)
    monkeypatch.setattr(client_module, "POLL_S", 0.0)


def tidegate(*argv: str | Path) -> int:
    """Parse ``argv`` with the client's subcommands and run the chosen handler."""
    parser = argparse.ArgumentParser(prog="tidegate")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.handler(args)


def spec_file(tmp_path: Path, job_id: str = "sweep-1", **fields: Any) -> Path:
    spec = {"job_id": job_id, "model": "tidegate.workloads:synthetic", "replicates": 2,
            "parameters": {"grid": {"k": [1, 2, 3, 4]}}}
    spec.update(fields)
    path = tmp_path / f"{job_id}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return path


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- submit -----------------------------------------------------------------------------


def test_submit_sends_the_spec_text_content_type_priority_and_token(
    daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """POST /v1/jobs carries the spec (code paths made absolute against the spec's
    directory), ?priority=N and the bearer token from TIDEGATE_TOKEN; the URL comes
    from TIDEGATE_URL."""
    daemon.token = TOKEN
    monkeypatch.setenv("TIDEGATE_TOKEN", TOKEN)
    monkeypatch.setenv("TIDEGATE_URL", daemon.url)
    path = spec_file(tmp_path, code_paths=["."])
    assert tidegate("submit", path, "--priority", "5") == 0
    (r,) = daemon.requests
    assert (r.method, r.path, r.query) == ("POST", "/v1/jobs", {"priority": ["5"]})
    assert r.headers["content-type"] == "application/yaml"
    assert r.headers["authorization"] == f"Bearer {TOKEN}"
    sent = yaml.safe_load(r.body)
    original = yaml.safe_load(path.read_text())
    assert sent["code_paths"] == [str(tmp_path.resolve())]
    assert {k: v for k, v in sent.items() if k != "code_paths"} == {
        k: v for k, v in original.items() if k != "code_paths"}
    assert capsys.readouterr().out == "submitted job sweep-1: queued\n"
    assert daemon.jobs["sweep-1"]["priority"] == 5


def test_submit_without_token_or_priority_sends_neither(
    daemon: FakeDaemon, tmp_path: Path
) -> None:
    """No TIDEGATE_TOKEN: no Authorization header; priority 0: no query string."""
    assert tidegate("submit", spec_file(tmp_path), "--url", daemon.url) == 0
    (r,) = daemon.requests
    assert r.query == {}
    assert "authorization" not in r.headers


def test_submit_json_prints_the_daemons_answer(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """submit --json prints the 201 body as JSON on stdout."""
    assert tidegate("submit", spec_file(tmp_path), "--json", "--url", daemon.url) == 0
    assert json.loads(capsys.readouterr().out) == {
        "id": "sweep-1", "url": "/v1/jobs/sweep-1", "state": "queued"}


def test_field_errors_are_rendered_naming_each_field(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 400 is exit 2 with one line per field error: field, expected, got."""
    path = spec_file(tmp_path, model=None, replicates=0)
    assert tidegate("submit", path, "--url", daemon.url) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "tidegate: error: job spec is not valid (HTTP 400):\n"
        "  - model: expected a callable reference 'module:function', got nothing\n"
        "  - replicates: expected a whole number >= 1, got 0\n"
    )


def test_a_single_field_error_is_not_repeated(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the message already states the only field error, it is shown once."""
    error = {"field": "replicates", "expected": "an integer >= 1", "got": "0"}
    daemon.forced[("POST", "/v1/jobs")] = (
        400, {"error": "request: replicates: expected an integer >= 1, got 0",
              "errors": [error]})
    assert tidegate("submit", spec_file(tmp_path), "--url", daemon.url) == 2
    assert capsys.readouterr().err == (
        "tidegate: error: request: replicates: expected an integer >= 1, got 0 (HTTP 400)\n")


@pytest.mark.parametrize("missing", ["nope.yaml", "dir"])
def test_unreadable_spec_file_exits_2_without_a_request(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """A spec file that is missing or a directory: exit 2 naming it; nothing sent."""
    (tmp_path / "dir").mkdir()
    assert tidegate("submit", tmp_path / missing, "--url", daemon.url) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tidegate: error: cannot read job spec {tmp_path / missing}: ")
    assert daemon.requests == []


# --- errors the daemon answers ----------------------------------------------------------


def test_401_without_a_token_says_to_set_tidegate_token(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon that needs a token, asked without one: exit 2 naming TIDEGATE_TOKEN."""
    daemon.token = TOKEN
    assert tidegate("jobs", "--url", daemon.url) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tidegate: error: the daemon at {daemon.url} requires an API "
                          "token: set TIDEGATE_TOKEN")
    assert "HTTP 401" in err


def test_401_with_a_wrong_token_says_it_was_refused(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong token: exit 2 saying the token in TIDEGATE_TOKEN was refused."""
    daemon.token = TOKEN
    monkeypatch.setenv("TIDEGATE_TOKEN", "wrong")
    assert tidegate("status", "x", "--url", daemon.url) == 2
    assert "refused the token in TIDEGATE_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["cancel", "ghost"], 404, "no job 'ghost' (HTTP 404)"),
    (["status", "ghost"], 404, "no job 'ghost' (HTTP 404)"),
    (["submit", "{spec}"], 409, "job 'sweep-1' is already queued (HTTP 409)"),
    (["submit", "{big}"], 413, "job spec is larger than 4096 bytes (HTTP 413)"),
    (["submit", "{spec}"], 403, "this token may only read (HTTP 403)"),
])
def test_client_errors_exit_2_with_the_daemons_message(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: list[str], status: int, message: str,
) -> None:
    """404, 409, 413 and 403 answers: exit 2, 'tidegate: error: <message> (HTTP n)', no
    traceback."""
    spec = spec_file(tmp_path)
    big = spec_file(tmp_path, "big", note="x" * 5000)
    if status == 409:
        assert tidegate("submit", spec, "--url", daemon.url) == 0
    if status == 403:
        daemon.forced[("POST", "/v1/jobs")] = (403, {"error": "this token may only read"})
    capsys.readouterr()
    argv = [a.format(spec=spec, big=big) for a in argv]
    assert tidegate(*argv, "--url", daemon.url) == 2
    captured = capsys.readouterr()
    assert captured.err == f"tidegate: error: {message}\n"
    assert captured.out == ""


@pytest.mark.parametrize("argv", [["jobs"], ["status"], ["status", "a"], ["cancel", "a"],
                                  ["submit", "{spec}"], ["submit", "{spec}", "--wait"]])
def test_unreachable_daemon_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Nothing listening at the URL: every command exits 3 naming the URL."""
    url = closed_port_url()
    argv = [a.format(spec=spec_file(tmp_path)) for a in argv]
    assert tidegate(*argv, "--url", url) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"tidegate: error: cannot reach the tidegate daemon at {url}: ")
    assert "Traceback" not in err


def test_server_error_exits_3(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    """A 5xx answer is the daemon's fault: exit 3 with its message."""
    daemon.forced[("GET", "/v1/jobs")] = (500, {"error": "database is locked"})
    assert tidegate("jobs", "--url", daemon.url) == 3
    assert capsys.readouterr().err == "tidegate: error: database is locked (HTTP 500)\n"


def test_bad_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL without http:// is bad input, reported without a request."""
    assert tidegate("jobs", "--url", "127.0.0.1:8790") == 2
    assert "daemon URL: expected http://HOST:PORT, got '127.0.0.1:8790'" in (
        capsys.readouterr().err)


# --- submit --wait ----------------------------------------------------------------------


def test_submit_wait_follows_the_job_to_success(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--wait reports each state (interrupted and resumed too), prints the final summary
    and exits 0 when every param is ok."""
    assert tidegate("submit", spec_file(tmp_path), "--wait", "--url", daemon.url) == 0
    captured = capsys.readouterr()
    states = [line.rsplit(": ", 1)[1].split(" ")[0] for line in captured.err.splitlines()
              if line.startswith("tidegate: job sweep-1: ")]
    assert states == ["queued", "running", "interrupted", "running", "succeeded"]
    assert "it resumes when the daemon is back" in captured.err
    assert "job sweep-1: succeeded (priority 0)" in captured.err
    assert "  params    4 ok, 0 failed of 4" in captured.err
    assert captured.out == ""
    gets = [r for r in daemon.requests if r.method == "GET"]
    assert len(gets) == len(TO_SUCCESS)


@pytest.mark.parametrize(("end", "code"), [
    (("succeeded", 4, 0), 0), (("succeeded", 3, 1), 4), (("completed_with_failures", 3, 1), 4),
    (("failed", 1, 0), 1), (("cancelled", 2, 0), 1),
])
def test_submit_wait_exits_as_tidegate_run(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    end: tuple[str, int, int], code: int,
) -> None:
    """The exit code of --wait is exit_code_for the final job: 0 only for success with no
    failed params; failed params are listed."""
    daemon.plan = [("running", 0, 0), end]
    assert tidegate("submit", spec_file(tmp_path), "--wait", "--url", daemon.url) == code
    err = capsys.readouterr().err
    if end[2]:
        assert "  failed    p0: ValueError: bad 0\n" in err


def test_submit_wait_json_prints_the_final_job(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--wait --json prints the final job as JSON on stdout, nothing else."""
    assert tidegate("submit", spec_file(tmp_path), "--wait", "--json",
                    "--url", daemon.url) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["id"], job["state"], job["params"]["ok"]) == ("sweep-1", "succeeded", 4)


def test_ctrl_c_while_waiting_leaves_the_job_running(
    daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C during --wait exits 130, says the job goes on, and cancels nothing."""
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(client_module, "_sleep", interrupt)
    assert tidegate("submit", spec_file(tmp_path), "--wait", "--url", daemon.url) == 130
    err = capsys.readouterr().err
    assert "stopped waiting; job sweep-1 goes on in the daemon" in err
    assert "tidegate cancel sweep-1" in err
    assert [r.method for r in daemon.requests] == ["POST", "GET"]


def test_daemon_lost_while_waiting_exits_3_and_says_the_job_was_submitted(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon hanging up mid-wait: exit 3, and the message says how to check later."""
    daemon.plan = [("running", 1, 0), "hangup"]
    assert tidegate("submit", spec_file(tmp_path), "--wait", "--url", daemon.url) == 3
    err = capsys.readouterr().err
    assert f"cannot reach the tidegate daemon at {daemon.url}" in err
    assert "job sweep-1 was submitted; check it with `tidegate status sweep-1`" in err


def test_submit_wait_on_a_terminal_draws_the_bar(
    daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, --wait draws tidegate's progress bar (rich's, on its live display)
    and leaves its last line before the final report."""
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert tidegate("submit", spec_file(tmp_path), "--wait", "--url", daemon.url) == 0
    lines = [Text.from_ansi(line).plain for line in tty.getvalue().splitlines()]
    bars = [i for i, line in enumerate(lines) if line.startswith("━") and " 4/4 " in line]
    assert bars, lines
    assert "job sweep-1: succeeded (priority 0)" in lines[bars[-1] + 1:], lines
    assert "  params    4 ok" in "\n".join(lines[bars[-1] + 1:]), lines


# --- jobs, status, cancel -----------------------------------------------------------------


def test_jobs_lists_newest_first_and_filters_by_state(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """jobs prints a table, newest first; --state asks the daemon for one state."""
    for job_id in ("a", "b"):
        tidegate("submit", spec_file(tmp_path, job_id), "--url", daemon.url)
    daemon.jobs["a"].update(state="failed", params={"total": 4, "ok": 2, "failed": 2})
    capsys.readouterr()
    assert tidegate("jobs", "--url", daemon.url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "PRIORITY", "PARAMS", "SUBMITTED"]
    assert lines[1].split()[:4] == ["b", "queued", "0", "0/?"]
    assert lines[2].split()[:6] == ["a", "failed", "0", "4/4", "(2", "failed)"]
    assert tidegate("jobs", "--state", "queued", "--url", daemon.url) == 0
    assert daemon.requests[-1].query == {"state": ["queued"]}
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["ID", "b"]
    assert tidegate("jobs", "--state", "running", "--url", daemon.url) == 0
    assert capsys.readouterr().out == "no running jobs\n"


def test_jobs_json_parses(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """jobs --json prints {"jobs": [...]} as the API does."""
    tidegate("submit", spec_file(tmp_path), "--url", daemon.url)
    capsys.readouterr()
    assert tidegate("jobs", "--json", "--url", daemon.url) == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)["jobs"]] == ["sweep-1"]


def test_status_without_a_job_shows_readiness_and_counts(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status prints whether the daemon is ready and how many jobs are in each state."""
    for job_id in ("a", "b", "c"):
        tidegate("submit", spec_file(tmp_path, job_id), "--url", daemon.url)
    daemon.jobs["c"]["state"] = "running"
    capsys.readouterr()
    assert tidegate("status", "--url", daemon.url) == 0
    assert capsys.readouterr().out == (
        f"daemon {daemon.url}: ready\n"
        "jobs    2 queued, 1 running, 0 succeeded, 0 completed_with_failures, 0 failed, "
        "0 cancelled, 0 interrupted\n"
    )
    assert tidegate("status", "--json", "--url", daemon.url) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["ready"], info["counts"]["queued"], info["counts"]["failed"]) == (True, 2, 0)


def test_status_of_a_daemon_not_ready_exits_3_with_the_reason(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 503 from /readyz is shown with its reason, and status exits 3."""
    daemon.ready = False
    assert tidegate("status", "--url", daemon.url) == 3
    assert capsys.readouterr().out.startswith(
        f"daemon {daemon.url}: not ready: scheduler not ok\n")


def test_status_of_a_job_is_a_human_summary(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """status JOB_ID shows state, params, B, in flight, OOM events, output, first errors."""
    daemon.jobs["run/1"] = job_dict("run/1", "running", ok=5, failed=7, total=20)
    assert tidegate("status", "run/1", "--url", daemon.url) == 0
    assert daemon.requests[-1].path == "/v1/jobs/run%2F1"
    out = capsys.readouterr().out
    assert out.startswith("job run/1: running (priority 0)\n")
    assert "  params    5 ok, 7 failed of 20 (0 from earlier runs)\n" in out
    assert "  batch     B=2, in flight 2 params / 6 tasks\n" in out
    assert "  workers   1 lost, 1 OOM events\n" in out
    assert "  output    /srv/tidegate/out/run/1\n" in out
    assert "  failed    p0: ValueError: bad 0\n" in out and "p4: " in out and "p5" not in out
    assert "and 2 more failed params" in out
    assert tidegate("status", "run/1", "--json", "--url", daemon.url) == 0
    assert json.loads(capsys.readouterr().out) == daemon.jobs["run/1"]


def test_cancel_reports_what_the_daemon_did(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cancel sends DELETE; a queued job is cancelled, a running one has a request, a
    finished one is left alone; --json prints the answer."""
    for job_id in ("q", "r", "s"):
        tidegate("submit", spec_file(tmp_path, job_id), "--url", daemon.url)
    daemon.jobs["r"]["state"] = "running"
    daemon.jobs["s"]["state"] = "succeeded"
    capsys.readouterr()
    for job_id in ("q", "r", "s"):
        assert tidegate("cancel", job_id, "--url", daemon.url) == 0
        assert (daemon.requests[-1].method, daemon.requests[-1].path) == (
            "DELETE", f"/v1/jobs/{job_id}")
    assert capsys.readouterr().out.splitlines() == [
        "job q: cancelled",
        "job r: cancelling; it stops after writing the params that have completed",
        "job s: already succeeded; nothing to cancel",
    ]
    assert tidegate("cancel", "r", "--json", "--url", daemon.url) == 0
    assert json.loads(capsys.readouterr().out) == {"id": "r", "state": "cancelling"}


# --- the Client and helpers directly -------------------------------------------------------


def test_client_wait_calls_on_update_for_every_poll(daemon: FakeDaemon, tmp_path: Path) -> None:
    """Client.wait returns the terminal job after passing each snapshot to on_update."""
    c = Client(daemon.url)
    job_id = c.submit(spec_file(tmp_path).read_text()).id
    seen: list[str] = []
    job = c.wait(job_id, on_update=lambda j: seen.append(j.state), poll_s=0)
    assert seen == [s for s, _, _ in TO_SUCCESS]
    assert job.state == "succeeded"


def test_client_raises_typed_errors(daemon: FakeDaemon) -> None:
    """ApiError carries status, message and field errors; DaemonUnreachable is raised
    when nothing listens."""
    with pytest.raises(ApiError) as info:
        Client(daemon.url).job("nope")
    assert (info.value.status, info.value.message, info.value.errors) == (
        404, "no job 'nope'", [])
    with pytest.raises(DaemonUnreachable):
        Client(closed_port_url(), timeout=2).jobs()


@pytest.mark.parametrize(("state", "failed", "code"), [
    ("succeeded", 0, 0), ("succeeded", 1, 4), ("completed_with_failures", 1, 4),
    ("failed", 0, 1), ("cancelled", 0, 1), ("interrupted", 0, 1),
])
def test_exit_code_for_matches_tidegate_run(state: str, failed: int, code: int) -> None:
    """0 only for a succeeded job without failed params; 4 for one completed with
    failures."""
    assert exit_code_for(job_dict("j", state, failed=failed)) == code


def test_progress_of_counts_this_runs_rate() -> None:
    """Progress from a job dict: done = ok + failed; rate excludes resumed params."""
    job = job_dict("j", "running", ok=30, failed=2, total=100)
    job["params"]["resumed"] = 12
    p = progress_of(job, now=T0 + 11)
    assert (p.total, p.done, p.failed, p.resumed, p.batch_size) == (100, 32, 2, 12, 2)
    assert (p.inflight_params, p.inflight_tasks, p.oom_events) == (2, 6, 1)
    assert (p.elapsed, p.rate) == (10.0, 2.0)
    assert progress_of({**job, "rate": 3.5}, now=T0 + 11).rate == 3.5
    queued = progress_of(job_dict("j", "queued"), now=T0)
    assert (queued.total, queued.rate, queued.elapsed) == (0, 0.0, 0.0)


def test_spec_paths_are_resolved_against_the_spec_file(tmp_path: Path) -> None:
    """Named code_paths and parameters.file become absolute, as the spec file means
    them; no code_paths are added; output stays relative to output_root; bad YAML
    passes."""
    from tidegate.client import with_absolute_paths

    text = "model: m:f\ncode_paths: ['.']\nparameters: {file: p.csv}\noutput: runs/a\n"
    sent = yaml.safe_load(with_absolute_paths(text, tmp_path))
    assert sent["code_paths"] == [str(tmp_path.resolve())]
    bare = yaml.safe_load(with_absolute_paths("model: m:f\n", tmp_path))
    assert "code_paths" not in bare
    assert sent["parameters"]["file"] == str(tmp_path.resolve() / "p.csv")
    assert sent["output"] == "runs/a"
    assert with_absolute_paths("model: [", tmp_path) == "model: ["


SEARCH = {"objective": "fit", "sampler": "tpe", "trials": 40, "told": 12, "failed": 2,
          "parallel": 4, "best": {"trial": 7, "param_id": "ab12cd34ef56ab78",
                                  "loss": 0.0123, "values": {"beta": 0.31, "gamma": 0.1}}}


def test_status_of_a_search_job_shows_its_best_loss_and_values(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """status JOB_ID of a search: a line with the trials told and the best loss at its
    values and trial; --json prints the search as it came; the bar's snapshot has it."""
    daemon.jobs["cal"] = job_dict("cal", "running", ok=10, failed=2, total=40, search=SEARCH)
    assert tidegate("status", "cal", "--url", daemon.url) == 0
    out = capsys.readouterr().out
    assert ("  search    told 12/40 (2 failed), best 0.0123 at {beta=0.31, gamma=0.1} "
            "(trial 7)\n") in out
    assert tidegate("status", "cal", "--json", "--url", daemon.url) == 0
    assert json.loads(capsys.readouterr().out)["search"] == SEARCH
    assert progress_of(daemon.jobs["cal"], now=T0 + 11).search == SEARCH
    daemon.jobs["grid"] = job_dict("grid", "running", ok=1, total=4, search=None)
    assert tidegate("status", "grid", "--url", daemon.url) == 0
    assert "search" not in capsys.readouterr().out
