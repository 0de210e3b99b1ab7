"""The daemon's HTTP API on tornado (which Dask already ships). JSON everywhere.

POST /v1/jobs, GET /v1/jobs, GET|DELETE /v1/jobs/{id}, GET /v1/openapi.json, GET /metrics,
/healthz, /readyz; the answers are the models of views.py. A token, when configured, is
required on every route but the probes and /metrics, and compared in constant time. Bodies
are streamed: the token is checked from the headers before any of the body is read, so an
unauthenticated body is never buffered; bodies over ``security.max_body_bytes`` get 413.
A spec is parsed, validated and expanded on a worker thread, one at a time, so a large
grid does not stall the event loop (``/healthz`` keeps answering).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import resource
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from tidegate.config import ConfigError
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

log = logging.getLogger(__name__)

_JOB_ID = ID_PATTERN.strip("^$")
_INT64 = 2**63
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
# Specs are expanded here, one at a time: two large submissions do not double the memory.
_SPEC_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-spec")


class Forbidden(TidegateError):
    """A job spec names code the daemon's security settings do not allow (HTTP 403)."""


@stream_request_body
class _Handler(RequestHandler):
    """JSON errors, token check, body limit. The body is streamed into ``self.body`` only
    once ``prepare`` has checked the token and the declared length."""

    public = False  # probes and metrics are open when True

    def initialize(self, service: Service) -> None:
        self.service = service
        self.body = bytearray()

    def prepare(self) -> None:
        if not self.public:
            try:
                token = self.service.token
            except ConfigError as exc:  # the token file went missing or empty: fail closed
                raise HTTPError(503, reason=str(exc.errors[0])) from None
            if token:
                given = self.request.headers.get("Authorization", "")
                scheme, _, value = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), token.encode()
                ):
                    self.set_header("WWW-Authenticate", 'Bearer realm="tidegate"')
                    raise HTTPError(401, reason="a valid bearer token is required")
        limit = self.service.config.security.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPError(
                413, reason=f"request body of {length} bytes over {limit} "
                "(security.max_body_bytes)"
            )
        # A chunked body has no length to check: tornado cuts it off past the limit.
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self.body += chunk

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


def _query_error(field: str, expected: str, got: str) -> ErrorBody:
    problem = FieldProblem(field=field, expected=expected, got=repr(got))
    return ErrorBody(error=f"{field}: expected {expected}, got {got!r}", errors=[problem])


class JobsHandler(_Handler):
    def get(self) -> None:
        state = self.get_query_argument("state", None)
        if state is not None and state not in set(JobState):
            known = ", ".join(JobState)
            self.send(400, _query_error("state", f"one of {known}", state))
            return
        records = self.queue.list(state=state)
        self.send(200, JobList(jobs=[self.service.view(r) for r in records]))

    async def post(self) -> None:
        text = self.get_query_argument("priority", "0")
        try:
            priority = int(text)
        except ValueError:
            priority = _INT64  # reported below
        if not -_INT64 <= priority < _INT64:
            expected = f"a whole number from {-_INT64} to {_INT64 - 1}"
            self.send(400, _query_error("priority", expected, text))
            return
        retry_text = self.get_query_argument("retry_failed", "false")
        retry_failed = _BOOLEANS.get(retry_text.lower())
        if retry_failed is None:
            self.send(400, _query_error("retry_failed", "true or false", retry_text))
            return
        prune_text = self.get_query_argument("prune", "false")
        prune = _BOOLEANS.get(prune_text.lower())
        if prune is None:
            self.send(400, _query_error("prune", "true or false", prune_text))
            return
        body = bytes(self.body)
        self.body = bytearray()
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(
                _SPEC_THREAD, self._prepare_spec, body
            )
            record = self.service.enqueue(prepared, priority=priority,
                                          retry_failed=retry_failed, prune=prune)
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

    def _prepare_spec(self, body: bytes) -> Any:
        """Parse and prepare a spec (on the spec thread, off the event loop)."""
        limits = self.service.spec_limits
        data = parse_yaml(body.decode("utf-8", "replace"), source="request", limits=limits.yaml)
        return self.service.prepare(data)


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


# How often a repeated connection problem is logged: one line with a count, never a
# traceback per connection (20,000 half-open sockets made 12 MB of log in seconds).
LOG_EVERY_S = 10.0
# How long accepting pauses after accept() failed (out of file descriptors): the pending
# connection stays queued and the socket readable, so retrying at once would spin.
ACCEPT_PAUSE_S = 0.5
_ACCEPT_BATCH = 128  # connections accepted per wake-up, as tornado's own accept handler


# File descriptors the daemon needs beside its HTTP connections: the job queue and
# ledgers (SQLite and journals), Parquet parts, the cluster's comms, logs.
FD_HEADROOM = 256


def connection_cap(max_connections: int) -> int:
    """security.max_connections, lowered (with a warning) to leave FD_HEADROOM under the
    open-file limit: a cap above it protects nothing, since accept() and then everything
    else (SQLite, Dask's monitors) fail with EMFILE first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or max_connections + FD_HEADROOM <= soft:
        return max_connections
    cap = max(1, soft - FD_HEADROOM)
    log.warning("security.max_connections (%d) plus %d for the daemon's own files is above "
                "the open-file limit (%d): at most %d connections; raise the limit "
                "(LimitNOFILE=, ulimit -n) for more", max_connections, FD_HEADROOM, soft, cap,
                extra={"action": "fd_limit_low"})
    return cap


class RateLimitedLog:
    """Logs the first occurrence at once, then at most one line every ``every_s`` seconds
    saying how many occurred since the last line."""

    def __init__(self, level: int, message: str, action: str,
                 every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.level, self.message, self.action = level, message, action
        self.every_s, self.clock = every_s, clock
        self.count = 0  # since the last line
        self.total = 0
        self._last: float | None = None

    def note(self, detail: str) -> None:
        self.count += 1
        self.total += 1
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s:
            window = "" if self._last is None else f" in the last {now - self._last:.0f} s"
            log.log(self.level, "%s: %s (%d time%s%s)", self.message, detail, self.count,
                    "" if self.count == 1 else "s", window, extra={"action": self.action})
            self.count, self._last = 0, now


class _Server(HTTPServer):
    """tornado's HTTPServer with a cap on open connections (beyond it a new connection is
    closed at once) and an accept loop that survives running out of file descriptors."""

    max_connections = 1000
    over_cap: RateLimitedLog
    accept_failed: RateLimitedLog

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if len(self._connections) >= self.max_connections:
            stream.close()
            self.over_cap.note(f"{self.max_connections} open")
            return
        super().handle_stream(stream, address)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)

    def _accept_on(self, sock: socket.socket) -> Callable[[], None]:
        """tornado.netutil.add_accept_handler, but an accept() error (EMFILE, ENFILE,
        ENOBUFS) pauses accepting for ACCEPT_PAUSE_S and is logged rate-limited, instead
        of a traceback from the IOLoop on every readable event."""
        loop = IOLoop.current()
        state = {"removed": False, "paused": False}

        def accept(fd: Any, events: int) -> None:
            for _ in range(_ACCEPT_BATCH):
                if state["removed"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    self.accept_failed.note(exc.strerror or str(exc))
                    loop.remove_handler(sock)
                    state["paused"] = True
                    loop.call_later(ACCEPT_PAUSE_S, resume)
                    return
                self._handle_connection(connection, address)

        def resume() -> None:
            state["paused"] = False
            if not state["removed"]:
                loop.add_handler(sock, accept, IOLoop.READ)

        def remove() -> None:
            if not state["paused"]:
                loop.remove_handler(sock)
            state["removed"] = True

        loop.add_handler(sock, accept, IOLoop.READ)
        return remove


def make_server(service: Service, host: str, port: int) -> tuple[HTTPServer, int]:
    """Bind and start serving; returns the server and the bound port (for port 0)."""
    # A declared length over the limit gets 413 from prepare(); the handler then sets the
    # limit itself for the body. Far larger bodies are cut off by tornado itself.
    security = service.config.security
    limit = security.max_body_bytes
    # idle_connection_timeout is tornado's header timeout too: a deadline for a request's
    # whole header block from its first byte, so trickling a byte at a time does not
    # extend it (tornado.http1connection, header_timeout).
    server = _Server(make_app(service), max_body_size=max(16 * limit, 16 * 2**20),
                     idle_connection_timeout=security.header_timeout_s,
                     body_timeout=security.body_timeout_s)
    server.max_connections = connection_cap(security.max_connections)
    server.over_cap = RateLimitedLog(
        logging.WARNING, "closed new HTTP connections over security.max_connections",
        "http_connections_refused")
    server.accept_failed = RateLimitedLog(
        logging.ERROR, "cannot accept HTTP connections (paused "
        f"{ACCEPT_PAUSE_S:g} s each time)", "http_accept_failed")
    sockets = bind_sockets(port, address=host, family=socket.AF_UNSPEC)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]
