"""The daemon's HTTP API on tornado (which Dask already ships). JSON everywhere.

POST /v1/jobs, GET /v1/jobs, GET|DELETE /v1/jobs/{id}, GET /metrics, /healthz, /readyz.
A token, when configured, is required on every route but the probes and compared in
constant time. Bodies over ``security.max_body_bytes`` get 413.
"""

from __future__ import annotations

import hmac
import json
import socket
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from tidegate.errors import TidegateError
from tidegate.jobqueue import JobExists, UnknownJob
from tidegate.spec import ID_PATTERN, SpecError, parse_yaml

if TYPE_CHECKING:
    from tidegate.service import Service

_JOB_ID = ID_PATTERN.strip("^$")


class Forbidden(TidegateError):
    """A job spec names code the daemon's security settings do not allow (HTTP 403)."""


class _Handler(RequestHandler):
    """JSON errors, token check, body limit."""

    public = False  # probes and metrics are open when True

    def initialize(self, service: Service) -> None:
        self.service = service

    def prepare(self) -> None:
        token = self.service.token
        if token and not self.public:
            given = self.request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), token.encode()
            ):
                self.set_header("WWW-Authenticate", 'Bearer realm="tidegate"')
                raise HTTPError(401, reason="a valid bearer token is required")
        limit = self.service.config.security.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if (length and length.isdigit() and int(length) > limit) or len(
            self.request.body or b""
        ) > limit:
            raise HTTPError(413, reason=f"request body over {limit} bytes")

    def send(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.reason:
            reason = exc.reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": reason}))


def job_view(service: Service, record: Any) -> dict[str, Any]:
    """A job as the API shows it: the record, with live numbers while it runs."""
    summary = record.summary or {}
    params = summary.get("params") or {"total": None, "ok": 0, "failed": 0, "resumed": 0,
                                       "quarantined": 0}
    view: dict[str, Any] = {
        "id": record.id,
        "url": f"/v1/jobs/{record.id}",
        "state": record.state,
        "priority": record.priority,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "cancel_requested": record.cancel_requested,
        "params": params,
        "batch_size": (summary.get("batch_size") or {}).get("final"),
        "inflight": {"params": 0, "tasks": 0},
        "oom_events": summary.get("oom_events", 0),
        "worker_restarts": summary.get("worker_restarts", 0),
        "output": record.output,
        "errors": (summary.get("errors") or [])[:10],
        "summary": record.summary,
        "error": record.error,
    }
    live = service.live(record.id)
    if live is not None:
        view.update(live)
    return view


class JobsHandler(_Handler):
    def get(self) -> None:
        state = self.get_query_argument("state", None)
        records = self.service.queue.list(state=state)
        self.send(200, {"jobs": [job_view(self.service, r) for r in records]})

    def post(self) -> None:
        try:
            priority = int(self.get_query_argument("priority", "0"))
        except ValueError:
            self.send(400, {"error": "priority: expected a whole number",
                            "errors": [{"field": "priority", "expected": "a whole number",
                                        "got": self.get_query_argument("priority")}]})
            return
        try:
            data = parse_yaml(self.request.body.decode("utf-8", "replace"), source="request")
            record = self.service.submit(data, priority=priority)
        except SpecError as exc:
            self.send(400, {"error": str(exc).splitlines()[0],
                            "errors": [{"field": e.field, "expected": e.expected, "got": e.got}
                                       for e in exc.errors]})
            return
        except JobExists as exc:
            self.send(409, {"error": str(exc)})
            return
        except Forbidden as exc:
            self.send(403, {"error": str(exc)})
            return
        self.send(201, {"id": record.id, "url": f"/v1/jobs/{record.id}",
                        "state": record.state})


class JobHandler(_Handler):
    def get(self, job_id: str) -> None:
        try:
            record = self.service.queue.get(job_id)
        except UnknownJob:
            self.send(404, {"error": f"no job {job_id!r}"})
            return
        self.send(200, job_view(self.service, record))

    def delete(self, job_id: str) -> None:
        try:
            record = self.service.cancel(job_id)
        except UnknownJob:
            self.send(404, {"error": f"no job {job_id!r}"})
            return
        state = "cancelling" if record.state == "running" else record.state
        self.send(202, {"id": record.id, "state": state})


class MetricsHandler(_Handler):
    public = True

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.service.metrics.exposition())


class HealthHandler(_Handler):
    public = True

    def get(self) -> None:
        self.send(200, {"status": "ok"})


class ReadyHandler(_Handler):
    public = True

    def get(self) -> None:
        checks = self.service.ready()
        ok = all(checks.values())
        self.send(200 if ok else 503, {"ready": ok, **checks})


def make_app(service: Service) -> Application:
    args = {"service": service}
    return Application(
        [
            (r"/v1/jobs/?", JobsHandler, args),
            (rf"/v1/jobs/({_JOB_ID})", JobHandler, args),
            (r"/metrics", MetricsHandler, args),
            (r"/healthz", HealthHandler, args),
            (r"/readyz", ReadyHandler, args),
        ],
        default_handler_class=_NotFound,
        default_handler_args=args,
    )


class _NotFound(_Handler):
    def prepare(self) -> None:
        super().prepare()
        raise HTTPError(404, reason="no such route")


def make_server(service: Service, host: str, port: int) -> tuple[HTTPServer, int]:
    """Bind and start serving; returns the server and the bound port (for port 0)."""
    # Bodies a little over the limit still reach the handler, which answers 413;
    # far larger ones are cut off by tornado itself.
    limit = service.config.security.max_body_bytes
    server = HTTPServer(make_app(service), max_body_size=max(16 * limit, 16 * 2**20))
    sockets = bind_sockets(port, address=host, family=socket.AF_UNSPEC)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]
