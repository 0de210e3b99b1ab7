"""The daemon's HTTP API on tornado (which Dask already ships). JSON everywhere.

POST /v1/jobs, GET /v1/jobs, GET|DELETE /v1/jobs/{id}, GET /v1/openapi.json, GET /metrics,
/healthz, /readyz; the answers are the models of views.py. A token, when configured, is
required on every route but the probes and /metrics, and compared in constant time. Bodies
over ``security.max_body_bytes`` get 413.
"""

from __future__ import annotations

import hmac
import json
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from tidegate.errors import TidegateError
from tidegate.jobqueue import JobExists, JobQueue, JobRecord, OutputInUse, UnknownJob
from tidegate.openapi import openapi_document
from tidegate.spec import ID_PATTERN, SpecError, parse_yaml
from tidegate.states import JobState
from tidegate.views import (
    CancelAnswer,
    ErrorBody,
    FieldProblem,
    Health,
    JobList,
    Readiness,
    Submitted,
    job_url,
)

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

    @property
    def queue(self) -> JobQueue:
        queue = self.service.queue
        if queue is None:  # the server binds after the queue opens; a backstop
            raise HTTPError(503, reason="the job queue is not open")
        return queue

    def send(self, status: int, body: BaseModel | dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.reason:
            reason = exc.reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(ErrorBody(error=reason).model_dump(mode="json")))


class JobsHandler(_Handler):
    def get(self) -> None:
        state = self.get_query_argument("state", None)
        records = self.queue.list(state=state)
        self.send(200, JobList(jobs=[self.service.view(r) for r in records]))

    def post(self) -> None:
        try:
            priority = int(self.get_query_argument("priority", "0"))
        except ValueError:
            got = self.get_query_argument("priority")
            problem = FieldProblem(field="priority", expected="a whole number", got=got)
            self.send(400, ErrorBody(error="priority: expected a whole number", errors=[problem]))
            return
        try:
            data = parse_yaml(self.request.body.decode("utf-8", "replace"), source="request")
            record = self.service.submit(data, priority=priority)
        except SpecError as exc:
            problems = [FieldProblem(field=e.field, expected=e.expected, got=e.got)
                        for e in exc.errors]
            self.send(400, ErrorBody(error=str(exc).splitlines()[0], errors=problems))
            return
        except (JobExists, OutputInUse) as exc:
            self.send(409, ErrorBody(error=str(exc)))
            return
        except Forbidden as exc:
            self.send(403, ErrorBody(error=str(exc)))
            return
        self.send(201, Submitted(id=record.id, url=job_url(record.id), state=record.state))


class JobHandler(_Handler):
    def get(self, job_id: str) -> None:
        self.send(200, self.service.view(_known(self.queue.get, job_id)))

    def delete(self, job_id: str) -> None:
        record = _known(self.service.cancel, job_id)
        state = "cancelling" if record.state == JobState.RUNNING else record.state
        self.send(202, CancelAnswer(id=record.id, state=state))


def _known(lookup: Callable[[str], JobRecord], job_id: str) -> JobRecord:
    """``lookup(job_id)``; an unknown job is a 404."""
    try:
        return lookup(job_id)
    except UnknownJob:
        raise HTTPError(404, reason=f"no job {job_id!r}") from None


class OpenAPIHandler(_Handler):
    def get(self) -> None:
        self.send(200, openapi_document())


class MetricsHandler(_Handler):
    public = True

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.service.metrics.exposition())


class HealthHandler(_Handler):
    public = True

    def get(self) -> None:
        self.send(200, Health(status="ok"))


class ReadyHandler(_Handler):
    public = True

    def get(self) -> None:
        checks = self.service.ready()
        ok = all(checks.values())
        self.send(200 if ok else 503, Readiness(ready=ok, **checks))


def make_app(service: Service) -> Application:
    args = {"service": service}
    return Application(
        [
            (r"/v1/jobs/?", JobsHandler, args),
            (rf"/v1/jobs/({_JOB_ID})", JobHandler, args),
            (r"/v1/openapi.json", OpenAPIHandler, args),
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
