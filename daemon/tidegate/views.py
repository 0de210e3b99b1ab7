"""What the HTTP API answers, as pydantic models shared by the daemon and its client.

The daemon builds a :class:`JobView` from the job queue's record and, while the job
runs, the runner's :class:`~tidegate.report.Progress`; the client parses every answer
with ``model_validate``. The OpenAPI document (``GET /v1/openapi.json``) is generated
from these models, so the three cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from tidegate.states import JobState

if TYPE_CHECKING:
    from tidegate.jobqueue import JobRecord
    from tidegate.report import Progress

SHOWN_ERRORS = 10  # failed params a job view lists; the summary in the output has them all


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


class _View(BaseModel):
    # A newer daemon's extra fields reach an older client intact (and `--json` prints them).
    model_config = ConfigDict(extra="allow")
    _absent_when_none: ClassVar[tuple[str, ...]] = ()  # keys left out rather than null
    # Keys null when given as null, left out when never given: an answer of a daemon
    # before them, parsed by a client, is printed back as it came.
    _absent_unless_given: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_nones(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in self._absent_when_none:
                if data.get(key) is None:
                    data.pop(key, None)
            for key in self._absent_unless_given:
                if data.get(key) is None and key not in self.model_fields_set:
                    data.pop(key, None)
        return data


class ParamCounts(_View):
    """How many params the job has and where they stand."""

    total: int | None = Field(default=None, description="null until the daemon expands the spec")
    ok: int = 0
    failed: int = 0
    resumed: int = Field(default=0, description="done by earlier runs of this job")
    quarantined: int = 0
    retried: int | None = Field(default=None, description="failed params of earlier runs "
                                "run again; only for a job submitted with retry_failed")
    pruned: int | None = Field(default=None, description="orphaned params (committed, no "
                               "longer in the spec) dropped from the output; only for a job "
                               "submitted with prune, once it has finished")
    _absent_when_none = ("retried", "pruned")


class InFlight(_View):
    """Params admitted to the cluster and not yet written, and their tasks."""

    params: int = 0
    tasks: int = 0


class ParamError(_View):
    """A failed param and its error text."""

    param_id: str
    error: str = ""


class FailureExample(_View):
    """One failed param of a group: its id, its parameter values and its message."""

    param_id: str
    values: dict[str, Any] = Field(default_factory=dict)
    message: str = ""


class ErrorGroup(_View):
    """Failed params of one kind: the error type and its message with numbers, hex ids
    and paths masked, how many, and three examples."""

    type: str
    message: str
    count: int
    examples: list[FailureExample] = Field(default_factory=list)


class SearchBest(_View):
    """A search's best trial so far: the lowest loss of its objective told."""

    trial: int = Field(description="the trial's number in the study")
    param_id: str
    loss: float
    values: dict[str, Any] = Field(default_factory=dict, description="its parameter values")


class SearchView(_View):
    """Where a search (``parameters.search``) stands: its budget, the trials told (each
    once its part is committed), those told as failed, and the best so far."""

    objective: str = Field(description="the target whose loss the search minimises")
    sampler: str
    trials: int = Field(description="the budget: parameters.search.trials")
    told: int = 0
    failed: int = Field(default=0, description="trials told as failed")
    parallel: int | None = Field(default=None, description="trials in flight at most")
    best: SearchBest | None = Field(default=None, description="null until a loss is told")


class JobView(_View):
    """A job as ``GET /v1/jobs/{id}`` returns it: the queue's record, with live numbers
    while it runs (``rate`` is present only then)."""

    id: str
    url: str
    state: JobState
    priority: int
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    retry_failed: bool | None = Field(
        default=None, description="true when submitted with retry_failed (its run first "
        "un-commits the failed params, to run them again); absent otherwise")
    params: ParamCounts
    batch_size: int | None = Field(description="B: now while running, else the final one")
    inflight: InFlight
    oom_events: int
    worker_restarts: int
    output: str | None
    errors: list[ParamError] = Field(description=f"the first {SHOWN_ERRORS} failed params")
    # Absent (not null) in the answers of daemons before it.
    error_groups: list[ErrorGroup] | None = Field(
        default=None, description="this run's failed params by kind, biggest first "
        "(tracebacks: the traceback column of the output's params dataset, or `tidegate "
        "failures OUTPUT_DIR`)")
    summary: dict[str, Any] | None = Field(
        description="the run's summary (`tidegate run --json`), once it has ended")
    error: str | None = Field(description="why the job itself failed or paused")
    rate: float | None = Field(default=None, description="params per second; only while running")
    prune: bool | None = Field(
        default=None, description="true when submitted with prune (its run ends by dropping "
        "from the output the committed params the spec no longer has); absent otherwise")
    search: SearchView | None = Field(
        default=None, description="a search's trials told and best loss so far (live while "
        "it runs, else its summary's `search`); null for a job that is not a search, or "
        "one whose run has not started")
    _absent_when_none = ("rate", "retry_failed", "error_groups", "prune")
    _absent_unless_given = ("search",)

    @classmethod
    def of(cls, record: JobRecord, live: Progress | None = None) -> JobView:
        """The view of a queue record; ``live`` is the runner's snapshot while it runs."""
        summary = record.summary or {}
        view = cls(
            id=record.id,
            url=job_url(record.id),
            state=record.state,
            priority=record.priority,
            submitted_at=record.submitted_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            cancel_requested=record.cancel_requested,
            retry_failed=True if record.retry_failed else None,
            prune=True if record.prune else None,
            params=ParamCounts.model_validate(summary.get("params") or {}),
            batch_size=(summary.get("batch_size") or {}).get("final"),
            inflight=InFlight(),
            oom_events=summary.get("oom_events", 0),
            worker_restarts=summary.get("worker_restarts", 0),
            output=record.output,
            errors=[ParamError.model_validate(e)
                    for e in (summary.get("errors") or [])[:SHOWN_ERRORS]],
            error_groups=[ErrorGroup.model_validate(g)
                          for g in summary.get("error_groups") or []],
            summary=record.summary,
            error=record.error,
            search=_search(summary.get("search")),
        )
        return view if live is None else view.with_progress(live)

    def with_progress(self, p: Progress) -> JobView:
        """This view with the live numbers of a running job."""
        return self.model_copy(update={
            "params": ParamCounts(total=p.total, ok=p.ok, failed=p.failed, resumed=p.resumed,
                                  quarantined=p.quarantined, retried=p.retried),
            "batch_size": p.batch_size,
            "inflight": InFlight(params=p.inflight_params, tasks=p.inflight_tasks),
            "oom_events": p.oom_events,
            "worker_restarts": p.worker_restarts,
            "errors": [ParamError.model_validate(e) for e in p.errors[:SHOWN_ERRORS]],
            "error_groups": [ErrorGroup.model_validate(g) for g in p.error_groups],
            "rate": round(p.rate, 3),
            # A snapshot of a search before its study opened has none: keep the stored one.
            "search": _search(p.search) if p.search is not None else self.search,
        })


def _search(data: Any) -> SearchView | None:
    return SearchView.model_validate(dict(data)) if isinstance(data, Mapping) and data else None


class JobList(_View):
    """``GET /v1/jobs``: jobs, newest submission first."""

    jobs: list[JobView]


class Submitted(_View):
    """``POST /v1/jobs`` (201): the job is queued."""

    id: str
    url: str
    state: JobState


class CancelAnswer(_View):
    """``DELETE /v1/jobs/{id}`` (202): ``cancelling`` while a running job stops, else the
    job's state (``cancelled``, or the state of a job that had already finished)."""

    id: str
    state: JobState | Literal["cancelling"]


class FieldProblem(_View):
    """One invalid field of a request: which, what was allowed, what arrived."""

    field: str
    expected: str
    got: str


class ErrorBody(_View):
    """Every error answer (4xx, 5xx); ``errors`` names the fields of a 400."""

    error: str
    errors: list[FieldProblem] | None = None
    _absent_when_none = ("errors",)


class Health(_View):
    """``GET /healthz``: the process answers."""

    status: Literal["ok"]


class Readiness(_View):
    """``GET /readyz`` (200 when ready, else 503): each check's result."""

    ready: bool
    scheduler: bool
    workers: bool = True  # the cluster has a worker (earlier daemons did not report it)
    store: bool
