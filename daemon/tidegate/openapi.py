"""The OpenAPI 3.1 document of the daemon's HTTP API (``GET /v1/openapi.json``),
generated from the models the handlers answer with (views.py)."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tidegate import __version__
from tidegate.states import JobState
from tidegate.views import (
    CancelAnswer,
    ErrorBody,
    Health,
    JobList,
    JobView,
    Readiness,
    Submitted,
)

REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    JobView, JobList, Submitted, CancelAnswer, ErrorBody, Health, Readiness,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "invalid request: `errors` names each field", 401: "no valid bearer token",
               403: "the spec names code the daemon's security settings do not allow",
               404: "no such job", 409: "a job with this id is queued, running or interrupted",
               413: "request body over security.max_body_bytes"}
    return {str(s): _json(ErrorBody, reasons[s]) for s in statuses}


_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "the job's job_id"}
_OPEN: list[dict[str, list[str]]] = []  # no security: the probes and /metrics

PATHS: dict[str, dict[str, Any]] = {
    "/v1/jobs": {
        "get": {
            "operationId": "listJobs", "summary": "Jobs, newest submission first",
            "parameters": [{"name": "state", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": [s.value for s in JobState]}}],
            "responses": {"200": _json(JobList, "the jobs"), **_errors(401)},
        },
        "post": {
            "operationId": "submitJob", "summary": "Queue a job spec (YAML or JSON)",
            "parameters": [{"name": "priority", "in": "query", "required": False,
                            "schema": {"type": "integer", "default": 0},
                            "description": "higher runs sooner"},
                           {"name": "retry_failed", "in": "query", "required": False,
                            "schema": {"type": "boolean", "default": False},
                            "description": "run again the params the job's output records "
                            "as failed or quarantined; the others stay as committed"},
                           {"name": "prune", "in": "query", "required": False,
                            "schema": {"type": "boolean", "default": False},
                            "description": "once the run has walked the whole spec, drop "
                            "from the output the committed params the spec no longer has "
                            "(orphaned)"}],
            "requestBody": {"required": True, "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}}}},
            "responses": {"201": _json(Submitted, "queued"),
                          **_errors(400, 401, 403, 409, 413)},
        },
    },
    "/v1/jobs/{id}": {
        "parameters": [_JOB_ID],
        "get": {
            "operationId": "getJob", "summary": "One job, with live numbers while it runs",
            "responses": {"200": _json(JobView, "the job"), **_errors(401, 404)},
        },
        "delete": {
            "operationId": "cancelJob",
            "summary": "Cancel a queued job now, or stop a running one",
            "responses": {"202": _json(CancelAnswer, "cancelled or cancelling"),
                          **_errors(401, 404)},
        },
    },
    "/v1/openapi.json": {
        "get": {
            "operationId": "getOpenAPI", "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "content": {"application/json": {"schema": {}}}},
                          **_errors(401)},
        },
    },
    "/metrics": {
        "get": {
            "operationId": "getMetrics", "summary": "Prometheus metrics", "security": _OPEN,
            "responses": {"200": {"description": "Prometheus text exposition",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        },
    },
    "/healthz": {
        "get": {
            "operationId": "getHealth", "summary": "Liveness", "security": _OPEN,
            "responses": {"200": _json(Health, "the process answers")},
        },
    },
    "/readyz": {
        "get": {
            "operationId": "getReadiness", "summary": "Readiness: scheduler and store",
            "security": _OPEN,
            "responses": {"200": _json(Readiness, "ready"),
                          "503": _json(Readiness, "not ready: the checks say why")},
        },
    },
}


@cache
def openapi_document() -> dict[str, Any]:
    """The whole document; every schema under components/schemas."""
    _, top = models_json_schema([(m, "validation") for m in _MODELS], ref_template=REF)
    schemas = top.get("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "tidegate", "version": __version__,
                 "description": "The tidegate daemon's job queue API. Every route but the "
                                "probes and /metrics needs the bearer token when the daemon "
                                "has one (security.token_file)."},
        "paths": PATHS,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
