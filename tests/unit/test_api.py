"""The HTTP API in-process (tornado on a free port, a real job queue, no cluster): its
answers are the views.py models and the OpenAPI document describes every route."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from tornado.httpclient import AsyncHTTPClient
from tornado.web import RequestHandler

from tidegate.api import make_app, make_server
from tidegate.config import load_config
from tidegate.jobqueue import JobQueue
from tidegate.metrics import Metrics
from tidegate.openapi import REF, openapi_document
from tidegate.report import Progress
from tidegate.service import Service
from tidegate.spec import SpecError
from tidegate.states import JobState
from tidegate.views import JobView

METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture
def service(tmp_path: Path) -> Any:
    config = load_config(None, {}, {"state_dir": str(tmp_path / "state"),
                                    "output_root": str(tmp_path / "out")})
    svc = Service(config, metrics=Metrics())
    svc.queue = JobQueue(tmp_path / "jobs.sqlite")
    yield svc
    svc.queue.close()


def fetch(service: Service, *requests: tuple[str, str]) -> list[tuple[int, Any]]:
    """Serve the API on a free port and make each (method, path) request in turn."""
    async def main() -> list[tuple[int, Any]]:
        server, port = make_server(service, "127.0.0.1", 0)
        client = AsyncHTTPClient()
        try:
            answers = []
            for method, path in requests:
                r = await client.fetch(f"http://127.0.0.1:{port}{path}", method=method,
                                       raise_error=False)
                answers.append((r.code, json.loads(r.body)))
            return answers
        finally:
            server.stop()
            client.close()

    return asyncio.run(main())


def schema_of(name: str) -> dict[str, Any]:
    """A JSON Schema for one component of the OpenAPI document, refs resolvable."""
    doc = openapi_document()
    return {"$ref": REF.format(model=name), "components": doc["components"]}


def _served_routes() -> set[tuple[str, str]]:
    """(method, OpenAPI path) for every route and method the tornado app serves."""
    routes = set()
    for rule in make_app(None).wildcard_router.rules:  # type: ignore[arg-type]
        pattern = rule.matcher.regex.pattern.rstrip("$")
        path = re.sub(r"\(.*\)", "{id}", pattern).removesuffix("/?")
        for method in METHODS:
            if getattr(rule.target, method) is not getattr(RequestHandler, method):
                routes.add((method, path))
    return routes


def test_openapi_document_is_valid_openapi_3_1() -> None:
    """The generated document passes openapi-spec-validator and names the bearer scheme."""
    doc = openapi_document()
    validate_openapi(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                               "scheme": "bearer"}
    assert {"JobView", "JobList", "Submitted", "ErrorBody"} <= set(doc["components"]["schemas"])


def test_every_served_route_is_in_the_document() -> None:
    """Each method of each route the app serves has an operation, and nothing more."""
    doc = openapi_document()
    documented = {(m, path) for path, item in doc["paths"].items() for m in item
                  if m in METHODS}
    served = _served_routes()
    assert ("get", "/v1/openapi.json") in served and ("delete", "/v1/jobs/{id}") in served
    assert served == documented


def test_job_answers_validate_against_the_jobview_schema(service: Service) -> None:
    """GET /v1/jobs/{id} and GET /v1/jobs answer JSON the document's schemas accept, and
    the served document is the generated one."""
    service.queue.submit("a", {"model": "m:f"}, "/out/a")
    service.queue.submit("b", {"model": "m:f"}, "/out/b")
    service.queue.start("b")
    service.queue.finish("b", JobState.FAILED, error="boom")
    (s1, job), (s2, listing), (s3, doc), (s4, missing) = fetch(
        service, ("GET", "/v1/jobs/a"), ("GET", "/v1/jobs"), ("GET", "/v1/openapi.json"),
        ("GET", "/v1/jobs/nope"))
    assert (s1, s2, s3, s4) == (200, 200, 200, 404)
    Draft202012Validator(schema_of("JobView")).validate(job)
    Draft202012Validator(schema_of("JobList")).validate(listing)
    Draft202012Validator(schema_of("ErrorBody")).validate(missing)
    assert missing == {"error": "no job 'nope'"}
    assert doc == json.loads(json.dumps(openapi_document()))
    assert job["state"] == "queued" and job["params"]["total"] is None and "rate" not in job
    assert [j["id"] for j in listing["jobs"]] == ["b", "a"]
    assert listing["jobs"][0]["error"] == "boom"


def test_job_view_keeps_todays_json_shape(service: Service) -> None:
    """A finished job's view: the keys and values the API has always returned, taken from
    the stored summary; a running one gets the live numbers and a rate."""
    queue = service.queue
    queue.submit("j", {"model": "m:f"}, "/out/j")
    queue.start("j")
    summary = {"params": {"total": 4, "ok": 3, "failed": 1, "resumed": 0, "quarantined": 0},
               "batch_size": {"min": 1, "max": 4, "final": 2}, "oom_events": 1,
               "worker_restarts": 2, "errors": [{"param_id": "p", "error": "E"}] * 12}
    record = queue.finish("j", JobState.SUCCEEDED, summary=summary)
    data = JobView.of(record).model_dump(mode="json")
    assert list(data) == ["id", "url", "state", "priority", "submitted_at", "started_at",
                          "finished_at", "cancel_requested", "params", "batch_size",
                          "inflight", "oom_events", "worker_restarts", "output", "errors",
                          "error_groups", "summary", "error", "search"]
    assert data["search"] is None  # not a search
    assert (data["url"], data["batch_size"], data["inflight"]) == (
        "/v1/jobs/j", 2, {"params": 0, "tasks": 0})
    assert (data["params"], data["summary"], len(data["errors"])) == (
        summary["params"], summary, 10)
    live = Progress(job_id="j", total=9, done=5, ok=4, failed=1, resumed=2, batch_size=3,
                    inflight_params=2, inflight_tasks=5, rate=1.23456, elapsed=3.0,
                    oom_events=1, quarantined=1, worker_restarts=4)
    running = JobView.of(record, live).model_dump(mode="json")
    assert running["params"] == {"total": 9, "ok": 4, "failed": 1, "resumed": 2,
                                 "quarantined": 1}
    assert (running["rate"], running["inflight"], running["worker_restarts"]) == (
        1.235, {"params": 2, "tasks": 5}, 4)
    assert JobView.model_validate(running).model_dump(mode="json") == running


def test_a_spec_whose_knobs_clash_with_the_daemons_is_refused_at_submit(tmp_path: Path) -> None:
    """batch.high_water 0.65 is valid alone but below this daemon's low_water 0.7: the
    submission is a 400 naming batch, not a job that stops the daemon when it starts."""
    config = load_config(None, {"TIDEGATE_CONTROLLER__LOW_WATER": "0.7",
                                "TIDEGATE_CONTROLLER__HIGH_WATER": "0.9"},
                         {"state_dir": str(tmp_path / "state"),
                          "output_root": str(tmp_path / "out")})
    svc = Service(config, metrics=Metrics())
    spec = {"model": "tidegate.workloads:synthetic", "parameters": {"values": [{"k": 1}]},
            "batch": {"high_water": 0.65}}
    with pytest.raises(SpecError) as info:
        svc.prepare(spec)
    (error,) = info.value.errors
    assert error.field == "batch" and "low_water" in error.got
    assert svc.prepare({**spec, "batch": {"high_water": 0.8}}).job.job_id


def post_spec(service: Service, spec: dict[str, Any]) -> tuple[int, Any]:
    """POST one JSON spec to the served API; (status, JSON answer)."""
    async def main() -> tuple[int, Any]:
        server, port = make_server(service, "127.0.0.1", 0)
        client = AsyncHTTPClient()
        try:
            r = await client.fetch(f"http://127.0.0.1:{port}/v1/jobs", method="POST",
                                   body=json.dumps(spec), raise_error=False)
            return r.code, json.loads(r.body)
        finally:
            server.stop()
            client.close()

    return asyncio.run(main())


SMALL = {"model": "tidegate.workloads:synthetic", "parameters": {"values": [{"k": 1}]}}


@pytest.mark.parametrize(("field", "change"), [
    ("output", {"output": "a\x00b"}),
    ("output", {"output": "o" * 300}),
    ("output", {"output": "o" * 5000}),
    ("code_paths[0]", {"code_paths": ["lib\x00"]}),
    ("code_paths[0]", {"code_paths": ["c" * 256]}),
    ("parameters.file", {"parameters": {"file": "p\x00.csv"}}),
    ("parameters.file", {"parameters": {"file": "p" * 300 + ".csv"}}),
])
def test_unusable_paths_are_400_naming_the_field(service: Service, field: str,
                                                 change: dict[str, Any]) -> None:
    """A NUL byte or a name the file system would refuse is a 400 naming the field and
    what a path must be, with the value cut short, not a 500 from inside resolve()."""
    status, body = post_spec(service, {**SMALL, **change})
    assert status == 400, body
    [problem] = body["errors"]
    assert problem["field"] == field
    assert "without NUL bytes" in problem["expected"]
    assert len(problem["got"]) < 120
    assert f"{field}: expected a path" in body["error"]


@pytest.mark.parametrize("allowed", [[], ["tidegate.workloads"]])
def test_private_callables_are_403(tmp_path: Path, allowed: list[str]) -> None:
    """`module:_helper` is refused like a reference that leaves its module, with or
    without an allowlist: an allowed module is allowed for what it makes public."""
    config = load_config(None, {}, {"state_dir": str(tmp_path / "state"),
                                    "output_root": str(tmp_path / "out"),
                                    "security.allowed_modules": allowed})
    svc = Service(config, metrics=Metrics())
    svc.queue = JobQueue(tmp_path / "jobs.sqlite")
    try:
        for spec in ({**SMALL, "model": "tidegate.workloads:_run_child"},
                     {**SMALL, "targets": [{"name": "t",
                                            "function": "tidegate.workloads:_spin"}]}):
            status, body = post_spec(svc, spec)
            assert status == 403, body
            assert "private" in body["error"] and "_" in body["error"]
        assert post_spec(svc, SMALL)[0] == 201  # the public one still is accepted
    finally:
        svc.queue.close()


@pytest.mark.parametrize("allowed", [[], ["tidegate.workloads"]])
def test_an_empty_allowlist_is_warned_about_at_start(tmp_path: Path, allowed: list[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """`tidegate serve` says at start that an empty security.allowed_modules lets token
    holders run any module; a set allowlist gives no such warning. (state_dir is a file,
    so start stops right after, before any socket or cluster.)"""
    from tidegate.service import StartupError

    (tmp_path / "state").write_text("not a directory")
    config = load_config(None, {}, {"state_dir": str(tmp_path / "state"),
                                    "output_root": str(tmp_path / "out"),
                                    "security.allowed_modules": allowed})
    with caplog.at_level("WARNING", logger="tidegate"), pytest.raises(StartupError):
        asyncio.run(Service(config, metrics=Metrics()).start())
    warned = [r for r in caplog.records if "allowed_modules is empty" in r.getMessage()]
    if allowed:
        assert not warned
    else:
        [record] = warned
        assert record.levelname == "WARNING"
        message = record.getMessage()
        assert "subprocess" in message and "any importable module" in message


def test_accept_errors_pause_and_are_logged_once_with_a_count(
        service: Service, caplog: pytest.LogCaptureFixture) -> None:
    """accept() failing with EMFILE (out of file descriptors) neither spins nor logs a
    traceback per attempt: accepting pauses ACCEPT_PAUSE_S, and within LOG_EVERY_S one
    line says what failed; once accept() works again the waiting connection is served."""
    import errno
    import socket

    from tidegate import api

    attempts: list[float] = []
    failing = [True]

    class Exhausted(socket.socket):
        def accept(self):  # type: ignore[no-untyped-def]
            if failing[0]:
                attempts.append(asyncio.get_running_loop().time())
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    async def main() -> int:
        server, _ = make_server(service, "127.0.0.1", 0)
        server.stop()  # only its settings and accept loop are used, on our socket
        sock = Exhausted(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        server.add_sockets([sock])
        client = AsyncHTTPClient()
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/healthz"
            pending = asyncio.ensure_future(client.fetch(url, raise_error=False))
            await asyncio.sleep(4 * api.ACCEPT_PAUSE_S)  # the time under test, not a sync
            failing[0] = False
            answer = await asyncio.wait_for(pending, 30)
        finally:
            server.stop()
            client.close()
            sock.close()  # closed here, not by the garbage collector in a later test
        return answer.code

    with caplog.at_level("ERROR"):
        assert asyncio.run(main()) == 200
    # Paused between attempts: about 4 in 2 s, not thousands.
    assert 2 <= len(attempts) <= 6, len(attempts)
    assert all(b - a >= api.ACCEPT_PAUSE_S * 0.9 for a, b in itertools.pairwise(attempts))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "Too many open files" in errors[0].getMessage()
    assert "cannot accept" in errors[0].getMessage() and errors[0].exc_info is None


def test_rate_limited_log_counts_between_lines(caplog: pytest.LogCaptureFixture) -> None:
    """The first occurrence logs at once; later ones only every every_s, with a count."""
    from tidegate.api import RateLimitedLog

    now = [0.0]
    limited = RateLimitedLog(40, "refused", "x", every_s=10, clock=lambda: now[0])
    with caplog.at_level("ERROR", logger="tidegate"):
        for t in range(25):  # one a second for 25 s
            now[0] = float(t)
            limited.note("EMFILE")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused: EMFILE (1 time)",
                        "refused: EMFILE (10 times in the last 10 s)",
                        "refused: EMFILE (10 times in the last 10 s)"]
    assert limited.total == 25


def test_a_connection_cap_above_the_fd_limit_is_lowered(
        caplog: pytest.LogCaptureFixture) -> None:
    """A cap the open-file limit would hit first protects nothing: it is lowered to leave
    FD_HEADROOM, with a warning; one that fits is kept silently."""
    import resource

    from tidegate.api import FD_HEADROOM, connection_cap

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit to exceed")
    with caplog.at_level("WARNING"):
        assert connection_cap(1) == 1
        assert not caplog.records
        assert connection_cap(soft) == max(1, soft - FD_HEADROOM)
    [record] = caplog.records
    assert "open-file limit" in record.getMessage() and str(soft) in record.getMessage()


def test_a_retry_of_a_search_is_400_naming_retry_failed(service: Service) -> None:
    """A search tells its failed trials as failed (Optuna cannot untell them): a retry of
    one is refused at submission, not a job that fails when it starts."""
    search = {**SMALL, "parameters": {"search": {
        "space": {"k": {"low": 0.0, "high": 1.0}}, "objective": "t", "trials": 3}},
        "targets": [{"name": "t", "function": "tidegate.workloads:synthetic_loss"}]}

    async def main() -> tuple[int, Any]:
        server, port = make_server(service, "127.0.0.1", 0)
        client = AsyncHTTPClient()
        try:
            r = await client.fetch(f"http://127.0.0.1:{port}/v1/jobs?retry_failed=true",
                                   method="POST", body=json.dumps(search), raise_error=False)
            return r.code, json.loads(r.body)
        finally:
            server.stop()
            client.close()

    status, body = asyncio.run(main())
    assert status == 400, body
    assert "retry_failed" in json.dumps(body) and "search" in json.dumps(body)
    assert service.queue is not None and not service.queue.list()


SEARCH_VIEW = {"objective": "fit", "sampler": "tpe", "trials": 40, "told": 12, "failed": 2,
               "parallel": 4, "best": {"trial": 7, "param_id": "ab12cd34ef56ab78",
                                       "loss": 0.0123, "values": {"beta": 0.31, "gamma": 0.1}}}


def test_a_search_jobs_view_carries_its_best_in_the_schema(service: Service) -> None:
    """GET /v1/jobs/{id} of a finished search: `search` from its summary (told, failed,
    best loss and values), valid under the document's JobView schema; a running one's
    comes from its live snapshot; a sweep's is null."""
    queue = service.queue
    assert queue is not None
    queue.submit("s", {"model": "m:f"}, "/out/s")
    queue.start("s")
    queue.finish("s", JobState.SUCCEEDED, summary={
        "params": {"total": 40, "ok": 38, "failed": 2}, "search": SEARCH_VIEW})
    queue.submit("g", {"model": "m:f"}, "/out/g")
    (s1, job), (s2, sweep) = fetch(service, ("GET", "/v1/jobs/s"), ("GET", "/v1/jobs/g"))
    assert (s1, s2) == (200, 200)
    validator = Draft202012Validator(schema_of("JobView"))
    validator.validate(job)
    validator.validate(sweep)
    assert job["search"] == SEARCH_VIEW and job["summary"]["search"] == SEARCH_VIEW
    assert sweep["search"] is None
    schema = openapi_document()["components"]["schemas"]
    assert set(schema["SearchView"]["properties"]) == set(SEARCH_VIEW)
    assert set(schema["SearchBest"]["properties"]) == set(SEARCH_VIEW["best"])
    bad = {**job, "search": {**SEARCH_VIEW, "told": "twelve"}}
    assert list(validator.iter_errors(bad)), "the schema types the search's fields"

    record = queue.get("s")
    live = {**SEARCH_VIEW, "told": 13, "best": {**SEARCH_VIEW["best"], "loss": 0.01}}
    p = Progress(job_id="s", total=40, done=13, ok=12, failed=1, resumed=0, batch_size=4,
                 inflight_params=4, inflight_tasks=8, rate=1.0, elapsed=3.0, search=live)
    running = JobView.of(record, p).model_dump(mode="json")
    validator.validate(running)
    assert running["search"] == live
    # A snapshot taken before the study opened has no search: the stored one stays.
    early = JobView.of(record, replace(p, search=None)).model_dump(mode="json")
    assert early["search"] == SEARCH_VIEW


def test_a_client_prints_an_older_daemons_answer_without_a_search_key() -> None:
    """A daemon before `search` sends no such key: parsed and printed back, the answer
    is as it came (the key is null only when the daemon sent null)."""
    data = {"id": "j", "url": "/v1/jobs/j", "state": "queued", "priority": 0,
            "submitted_at": 1.0, "started_at": None, "finished_at": None,
            "cancel_requested": False, "params": {"total": None}, "batch_size": None,
            "inflight": {}, "oom_events": 0, "worker_restarts": 0, "output": None,
            "errors": [], "summary": None, "error": None}
    assert "search" not in JobView.model_validate(data).model_dump(mode="json")
    sent = JobView.model_validate({**data, "search": None}).model_dump(mode="json")
    assert "search" in sent and sent["search"] is None
