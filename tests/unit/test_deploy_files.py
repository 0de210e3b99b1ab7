"""The deployment files (Grafana dashboard and provisioning, Prometheus rules and config,
Dockerfile, .dockerignore, Kubernetes manifests) parse and say what the docs say they say.

No container engine, Kubernetes or Grafana runs here: this checks what can be checked
without them. Real promtool, Prometheus and daemon runs are in
tests/integration/test_operations.py, which reuses the PromQL helpers below.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from dask.utils import parse_bytes

from tidegate.config import load_config

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "tidegate.json"
PROVISIONING = REPO / "grafana" / "provisioning"
PROMETHEUS = REPO / "config" / "prometheus"
K8S = REPO / "config" / "k8s"
RUNBOOK = REPO / "docs" / "operations.md"
RUNBOOK_BASE = "https://github.com/tidegate/tidegate/blob/main/docs/operations.md"

ALERTS = {
    # alert -> metrics its expression must read
    "TidegateDown": {"up"},
    "TidegateOOMKill": {"tidegate_oom_events_total"},
    "TidegateRepeatedOOMKills": {"tidegate_oom_events_total"},
    "TidegateBatchSizeAtMinimum": {"tidegate_batch_size", "tidegate_jobs"},
    "TidegateJobStalled": {"tidegate_params_total", "tidegate_jobs"},
    "TidegateSchedulerDisconnected": {"tidegate_scheduler_connected"},
    "TidegateWorkerMemoryHigh": {"tidegate_cluster_memory_bytes", "tidegate_jobs"},
    "TidegateSlowFlushes": {"tidegate_flush_seconds_bucket"},
}

# --- PromQL in the dashboard and the rules (also used by the integration tests) -------------

JOB_SENTINEL = "tidegate-job-variable"
# Values that make Grafana's variables valid PromQL; an unknown variable is an error, so a
# new one has to be added here on purpose.
GRAFANA_VARIABLES = {
    "job": JOB_SENTINEL,
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute_grafana_variables(expr: str) -> str:
    """``expr`` with $job, ${job}, $__rate_interval, ... replaced by valid values."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, expr)


@dataclass(frozen=True)
class Query:
    where: str  # e.g. "panel 'Flush latency' A" or "alert TidegateDown"
    expr: str  # as written (Grafana variables unreplaced)

    def parsed(self) -> promql_parser.Expr:
        return promql_parser.parse(substitute_grafana_variables(self.expr))


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel but the rows."""
    return [p for p in _panels(load_dashboard()["panels"]) if p["type"] != "row"]


def dashboard_queries() -> list[Query]:
    """Every PromQL expression of the dashboard: panel targets, annotations, and the
    selector inside each variable's label_values()."""
    dashboard = load_dashboard()
    queries = [
        Query(f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard_panels()
        for t in p["targets"]
    ]
    queries += [
        Query(f"annotation {a['name']!r}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert match, f"variable {var['name']}: expected label_values(selector, label)"
            queries.append(Query(f"variable ${var['name']}", match[1]))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


def selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    """Every vector selector in ``expr``, including those inside range selectors,
    subqueries and function calls."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def selector_name(selector: promql_parser.VectorSelector) -> str | None:
    """The metric a selector reads: its name, or an equality __name__ matcher."""
    if selector.name:
        return selector.name
    for m in selector.matchers.matchers:
        if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
            return m.value
    return None


def metric_names(query: Query) -> set[str]:
    names = {selector_name(s) for s in selectors(query.parsed())}
    assert None not in names, f"{query.where}: a selector without a metric name"
    return names  # type: ignore[return-value]


# --- Grafana --------------------------------------------------------------------------------


def test_dashboard_has_job_and_datasource_variables() -> None:
    """The dashboard has a stable uid, a Prometheus variable and a $job variable."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "tidegate"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query"
    assert job["query"]["query"] == "label_values(tidegate_build_info, job)"
    assert job["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_unit_a_datasource_and_a_place() -> None:
    """Every panel has a unit, reads ${datasource}, has a unique id and fits the grid."""
    panels = dashboard_panels()
    ids = [p["id"] for p in _panels(load_dashboard()["panels"])]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
    units = {p["fieldConfig"]["defaults"]["unit"] for p in panels}
    assert {"bytes", "s", "ops"} <= units


@pytest.mark.parametrize(
    ("title", "unit", "metrics"),
    [
        (
            "Batch size B vs target and ceilings",
            "short",
            {"tidegate_batch_size", "tidegate_batch_size_target", "tidegate_batch_size_ceiling"},
        ),
        (
            "Params and tasks in flight",
            "short",
            {"tidegate_inflight_params", "tidegate_inflight_tasks"},
        ),
        ("Cluster memory: used vs budget vs limit", "bytes", {"tidegate_cluster_memory_bytes"}),
        (
            "Workers lost, by cause",
            "short",
            {"tidegate_worker_restarts_total", "tidegate_oom_events_total"},
        ),
        ("SimReturn size quantiles", "bytes", {"tidegate_simreturn_bytes_bucket"}),
        ("Params completed per second", "ops", {"tidegate_params_total"}),
        ("Running job progress", "percentunit", {"tidegate_job_params"}),
        ("Jobs by state", "short", {"tidegate_jobs"}),
        ("Flush latency", "s", {"tidegate_flush_seconds_bucket"}),
        ("Scheduler connected", "none", {"tidegate_scheduler_connected"}),
        ("Search best loss", "short", {"tidegate_search_best_loss"}),
        ("Search trials: told and failed vs budget", "short", {"tidegate_search_trials"}),
    ],
)
def test_dashboard_panel(title: str, unit: str, metrics: set[str]) -> None:
    """Each panel the issue asks for exists, reads its metrics and has its unit."""
    panel = next((p for p in dashboard_panels() if p["title"] == title), None)
    assert panel is not None, f"no panel {title!r}"
    assert panel["fieldConfig"]["defaults"]["unit"] == unit
    read = set().union(*(metric_names(Query(title, t["expr"])) for t in panel["targets"]))
    assert metrics <= read, metrics - read


def test_quantiles_use_histogram_quantile_over_buckets() -> None:
    """Size and flush quantiles are histogram_quantile over _bucket, summed by le."""
    for title, bucket in [
        ("SimReturn size quantiles", "tidegate_simreturn_bytes_bucket"),
        ("Flush latency", "tidegate_flush_seconds_bucket"),
    ]:
        panel = next(p for p in dashboard_panels() if p["title"] == title)
        quantiles = [t["expr"] for t in panel["targets"] if "histogram_quantile" in t["expr"]]
        assert len(quantiles) >= 2, title
        for expr in quantiles:
            parsed = Query(title, expr).parsed()
            assert isinstance(parsed, promql_parser.Call)
            assert parsed.func.name == "histogram_quantile"
            assert metric_names(Query(title, expr)) == {bucket}
            assert "by (le)" in expr


def test_every_dashboard_query_parses_and_follows_job() -> None:
    """Every dashboard query parses as PromQL and each selector filters on job="$job"."""
    queries = dashboard_queries()
    assert len(queries) > 20
    for q in queries:
        if q.where.startswith("variable"):
            continue  # the variable's own query lists the jobs
        for s in selectors(q.parsed()):
            jobs = [m for m in s.matchers.matchers if m.name == "job"]
            assert [(m.op, m.value) for m in jobs] == [
                (promql_parser.MatchOp.Equal, JOB_SENTINEL)
            ], f"{q.where}: {q.expr}"


def test_unknown_grafana_variable_is_refused() -> None:
    """Grafana variable substitution refuses a variable it does not know."""
    assert substitute_grafana_variables('rate(x{job="$job"}[$__rate_interval])') == (
        f'rate(x{{job="{JOB_SENTINEL}"}}[1m])'
    )
    with pytest.raises(KeyError):
        substitute_grafana_variables('x{instance="$instance"}')


def test_provisioning_finds_the_dashboard_and_a_prometheus() -> None:
    """Provisioning resolves to grafana/dashboards and adds a Prometheus data source."""
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "tidegate.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    raw = provider["options"]["path"]
    assert "${GF_PATHS_PROVISIONING}" in raw
    path = Path(raw.replace("${GF_PATHS_PROVISIONING}", str(PROVISIONING))).resolve()
    assert path == DASHBOARD.parent
    assert DASHBOARD in path.glob("*.json")
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"].startswith("http")


# --- Prometheus -----------------------------------------------------------------------------


def _runbook_anchors() -> set[str]:
    """GitHub's anchors for the runbook's headings."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match[1].strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_has_for_severity_summary_and_runbook() -> None:
    """Each alert has for:, a severity, a summary and a runbook link to its section."""
    anchors = _runbook_anchors()
    rules = alert_rules()
    assert {r["alert"] for r in rules} == set(ALERTS)
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"


def test_oom_alerts_warn_then_page() -> None:
    """One OOM event is a warning, repeated ones are critical."""
    severity = {r["alert"]: r["labels"]["severity"] for r in alert_rules()}
    assert severity["TidegateOOMKill"] == "warning"
    assert severity["TidegateRepeatedOOMKills"] == "critical"


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_alert_reads_its_metrics(alert: str) -> None:
    """Each alert's expression parses and reads the metrics the issue names for it."""
    (query,) = [q for q in alert_queries() if q.where == f"alert {alert}"]
    assert ALERTS[alert] <= metric_names(query)


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    """alerts_test.yml has a firing and a quiet case for every alert."""
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fires == set(ALERTS), set(ALERTS) - fires
    assert quiet == set(ALERTS), set(ALERTS) - quiet


def test_prometheus_example_scrapes_a_local_daemon() -> None:
    """prometheus.yml scrapes 127.0.0.1:8790 as job `tidegate` and loads alerts.yml."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tidegate"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8790"]}]
    assert load_config(None, env={}).listen == "127.0.0.1:8790"  # the daemon's default


# --- Dockerfile -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    text = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        text += line.rstrip()
        if text.endswith("\\"):
            text = text[:-1] + " "
            continue
        name, _, args = text.strip().partition(" ")
        out.append(Instruction(name.upper(), args.strip()))
        text = ""
    return out


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in dockerfile():
        if ins.name == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"expected the exec (JSON) form, got {args}"
    return value


def image_env() -> dict[str, str]:
    """The final stage's ENV, as key=value pairs."""
    env: dict[str, str] = {}
    for ins in stages()[-1]:
        if ins.name == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from)."""
    out = []
    for ins in dockerfile():
        if ins.name != "COPY":
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it (Go's filepath.Match plus **)."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _ignore_regex(pattern)))
    return rules


def in_build_context(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, '/'-separated): the last pattern
    matching it or one of its parents decides, as in Docker's pattern matcher."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    keep = True
    for negate, regex in ignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            keep = negate
    return keep


def build_context() -> list[Path]:
    """The files `docker build .` would send, per .dockerignore (git-tracked or not)."""
    return sorted(
        p
        for p in REPO.rglob("*")
        if p.is_file()
        and ".venv" not in p.parts
        and ".git" not in p.parts
        and in_build_context(p.relative_to(REPO).as_posix())
    )


def test_dockerfile_is_multi_stage_from_python_slim() -> None:
    """A builder stage makes wheels; python:3.11-slim installs only tidegate from them."""
    builder, final = stages()[0], stages()[-1]
    assert builder[0].args == "python:3.11-slim AS builder"
    assert final[0].args == "python:3.11-slim"
    builder_runs = " ".join(i.args for i in builder if i.name == "RUN")
    assert "pip wheel --wheel-dir /wheels ." in builder_runs
    final_runs = " ".join(i.args for i in final if i.name == "RUN")
    assert "from=builder" in final_runs
    # tidegate alone: no [dev] or [examples] extra
    assert re.search(r"pip install --no-index --find-links=/wheels tidegate(\s|$)", final_runs)


def test_dockerfile_runs_tidegate_serve_as_a_non_root_user() -> None:
    """The image runs `tidegate serve` as non-root, on 0.0.0.0:8790, state in a volume."""
    final = stages()[-1]
    last = {i.name: i.args for i in final}
    assert _exec_form(last["ENTRYPOINT"]) == ["tidegate"]
    assert _exec_form(last["CMD"]) == ["serve", "--config", "/etc/tidegate/tidegate.yaml"]
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert "/var/lib/tidegate" in _exec_form(last["VOLUME"])
    assert image_env()["TIDEGATE_LISTEN"] == "0.0.0.0:8790"
    assert last["EXPOSE"] == "8790"


def test_healthcheck_asks_healthz_with_python() -> None:
    """HEALTHCHECK runs python -c with urllib against /healthz (no curl in the image)."""
    (check,) = [i for i in dockerfile() if i.name == "HEALTHCHECK"]
    options, _, command = check.args.partition("CMD ")
    assert "--start-period=" in options and "--interval=" in options
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "/healthz" in argv[2]
    assert "curl" not in check.args


def test_dockerfile_copies_exist_in_the_build_context() -> None:
    """Every COPY source exists and .dockerignore lets it into the build context."""
    context = {p.relative_to(REPO).as_posix() for p in build_context()}
    for sources, _ in copies():
        for source in sources:
            path = REPO / source
            assert path.exists(), source
            files = (
                [path]
                if path.is_file()
                else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            )
            assert files, source
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if ".egg-info" in rel:
                    continue
                assert rel in context, f"{rel} is copied but .dockerignore excludes it"


def test_build_context_is_what_the_wheel_needs_and_no_more() -> None:
    """The build context holds what the wheel needs and no tests, venv or caches."""
    context = {p.relative_to(REPO).as_posix() for p in build_context()}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pyproject.toml" in context
    assert project["project"]["readme"] in context
    (where,) = project["tool"]["setuptools"]["packages"]["find"]["where"]
    modules = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / where).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules and modules <= context
    assert f"{where}/tidegate/py.typed" in context
    for path in context:
        assert not path.startswith(("tests/", "examples/", "bench/", ".ci/", "docs/")), path
        assert "__pycache__" not in path and ".egg-info" not in path, path
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/conftest.py"):
        assert not in_build_context(excluded)


def test_dockerignore_matching_follows_docker() -> None:
    """The .dockerignore matcher: last match wins, parents count, ** spans folders."""
    assert in_build_context("daemon/tidegate/cli.py")
    assert not in_build_context("daemon/tidegate/__pycache__/cli.cpython-311.pyc")
    assert in_build_context("config/tidegate.yaml")
    assert not in_build_context("config/k8s/deployment.yaml")
    assert not in_build_context("Makefile")


def test_image_config_is_the_shipped_example() -> None:
    """The image's config is the shipped example and loads with the image's ENV."""
    config_path = _exec_form({i.name: i.args for i in stages()[-1]}["CMD"])[2]
    (sources,) = [s for s, dest in copies() if dest == config_path]
    assert sources == ["config/tidegate.yaml"]
    env = {k: v for k, v in image_env().items() if k.startswith("TIDEGATE_")}
    config = load_config(REPO / "config" / "tidegate.yaml", env=env)
    assert config.listen == "0.0.0.0:8790" and not config.is_loopback()
    assert config.security.token_file is not None
    volume = Path(_exec_form({i.name: i.args for i in stages()[-1]}["VOLUME"])[0])
    assert config.state_dir.is_relative_to(volume)
    assert config.output_root.is_relative_to(volume)


# --- the runbook ----------------------------------------------------------------------------


def test_runbook_documents_every_config_key_variable_and_flag() -> None:
    """The runbook names every config key, its TIDEGATE_ variable and serve flag."""
    from tidegate.cli import build_parser
    from tidegate.config import KEYS

    text = RUNBOOK.read_text()
    for key in KEYS.values():
        assert f"`{key.dotted}`" in text, key.dotted
        assert f"`{key.env}`" in text, key.env
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    for action in serve._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--config"):
                assert f"`{flag}`" in text, flag


def test_runbook_documents_every_metric() -> None:
    """The runbook explains every metric family the daemon registers."""
    from prometheus_client.parser import text_string_to_metric_families

    from tidegate.metrics import Metrics

    text = RUNBOOK.read_text()
    exposition = Metrics(process=True).exposition().decode()
    for family in text_string_to_metric_families(exposition):
        if family.name.endswith("_created"):
            continue  # counters' and histograms' creation times, described once
        name = family.name + ("_total" if family.type == "counter" else "")
        name = name + "_info" if family.type == "info" else name
        assert f"`{name}`" in text, name


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted(K8S.glob("*.yaml"))
    }


def k8s(kind: str) -> dict[str, Any]:
    (doc,) = [d for docs in k8s_documents().values() for d in docs if d["kind"] == kind]
    return doc


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def configmap_config(tmp_path: Path) -> Any:
    """The ConfigMap's tidegate.yaml loaded with tidegate's own loader and the
    Deployment's environment."""
    data = k8s("ConfigMap")["data"]
    path = tmp_path / "tidegate.yaml"
    path.write_text(data["tidegate.yaml"])
    env = {e["name"]: e["value"] for e in container(k8s("Deployment")).get("env", [])}
    return load_config(path, env=env)


def quantity(text: str) -> int:
    """A Kubernetes memory quantity (4Gi, 512Mi, 1G) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?", str(text))
    assert match, text
    scale = {
        None: 1,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }[match[2]]
    return int(match[1]) * scale


def test_k8s_manifests_parse_and_kustomization_lists_them() -> None:
    """Every manifest parses, is named, and kustomization.yaml lists every file."""
    docs = k8s_documents()
    kustomization = docs.pop("kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(docs)
    kinds = set()
    for name, items in docs.items():
        for doc in items:
            assert doc["apiVersion"] and doc["metadata"]["name"], name
            kinds.add(doc["kind"])
    assert kinds == {
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "DaskCluster",
    }


def test_deployment_is_one_writer_with_probes(tmp_path: Path) -> None:
    """One replica, Recreate, /healthz and /readyz probes, grace above drain_timeout_s."""
    deployment = k8s("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    c = container(deployment)
    (port,) = c["ports"]
    config = configmap_config(tmp_path)
    assert port["containerPort"] == config.port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.drain_timeout_s
    assert c["args"] == ["serve", "--config", "/etc/tidegate/tidegate.yaml"]


def test_deployment_mounts_config_token_and_volume(tmp_path: Path) -> None:
    """Config, token and volume are mounted where the ConfigMap's config expects them."""
    deployment = k8s("Deployment")
    c = container(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: Path(m["mountPath"]) for m in c["volumeMounts"]}
    config = configmap_config(tmp_path)

    config_mount = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_mount]["configMap"]["name"] == k8s("ConfigMap")["metadata"]["name"]
    assert mounts[config_mount] / "tidegate.yaml" == Path(c["args"][2])
    token_mount = next(n for n, v in volumes.items() if "secret" in v)
    secret = k8s("Secret")
    assert volumes[token_mount]["secret"]["secretName"] == secret["metadata"]["name"]
    assert config.security.token_file == mounts[token_mount] / "token"
    assert "token" in secret["stringData"]
    data_mount = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    pvc = k8s("PersistentVolumeClaim")
    assert volumes[data_mount]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert config.state_dir.is_relative_to(mounts[data_mount])
    assert config.output_root.is_relative_to(mounts[data_mount])


def test_pod_is_scraped_and_served(tmp_path: Path) -> None:
    """The pod carries scrape annotations for its port; the Service targets it."""
    deployment = k8s("Deployment")
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    config = configmap_config(tmp_path)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = k8s("Service")
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container(deployment)["ports"][0]["name"]


def test_configmap_config_connects_to_the_dask_cluster(tmp_path: Path) -> None:
    """The ConfigMap's config loads and points at the DaskCluster's scheduler Service."""
    config = configmap_config(tmp_path)
    cluster = k8s("DaskCluster")
    name = cluster["metadata"]["name"]
    service_ports = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert config.cluster.address == f"tcp://{name}-scheduler:{service_ports['tcp-comm']}"
    assert config.listen == "0.0.0.0:8790"
    assert config.log.format == "json"


def test_shipped_configs_name_their_allowed_modules(tmp_path: Path) -> None:
    """Both shipped configs list the modules jobs may run: an empty allowlist lets any
    token holder run any importable module (subprocess:Popen), against the threat model."""
    from tidegate.config import load_config as load

    for config in (configmap_config(tmp_path), load(REPO / "config" / "tidegate.yaml", {})):
        assert config.security.allowed_modules == ["tidegate.workloads"]


def test_daskcluster_worker_memory_limit_below_container_limit() -> None:
    """DaskCluster workers' memory_limit is below their container limit, with why."""
    cluster = k8s("DaskCluster")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    args = worker["args"]
    dask_limit = parse_bytes(args[args.index("--memory-limit") + 1])
    container_limit = quantity(worker["resources"]["limits"]["memory"])
    assert 0 < dask_limit < container_limit
    assert worker["command"] == ["dask", "worker"]
    text = (K8S / "daskcluster.yaml").read_text()
    for phrase in ("cgroup v2", "nanny included", "memory_terminate"):
        assert phrase in text
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert scheduler["command"] == ["dask", "scheduler"]
    ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
    assert ports["tcp-comm"] == 8786
