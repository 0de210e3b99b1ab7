"""Bounds checked before expansion (params, replicates, tasks, YAML depth and aliases),
YAML 1.2 floats, case-colliding param names, and the API's checks that come before a
body is read or a query is used."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from tidegate.api import make_server
from tidegate.config import ConfigError, TokenFile, load_config
from tidegate.jobqueue import JobQueue
from tidegate.metrics import Metrics
from tidegate.service import Service
from tidegate.spec import SpecError, SpecLimits, job_from_dict, parse_yaml
from tidegate.validation import YamlLimits

BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]"
            for p, x in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def base(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": "tidegate.workloads:synthetic",
                            "parameters": {"grid": {"k": [1, 2]}}}
    data.update(changes)
    return data


def errors_of(data: Any, limits: SpecLimits | None = None, base_dir: Path = Path(".")
              ) -> list[str]:
    with pytest.raises(SpecError) as info:
        job_from_dict(data, base_dir=base_dir, **({"limits": limits} if limits else {}))
    return [str(e) for e in info.value.errors]


# --- YAML ---------------------------------------------------------------------------------


def test_alias_bomb_is_refused_while_composing_quickly_and_small() -> None:
    """A 400-byte billion-laughs document is refused naming the limit's key, in well
    under a second and without building the expansion."""
    assert len(BOMB) < 600
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_yaml(BOMB)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "limits.yaml_alias_nodes" in str(info.value)
    assert elapsed < 1.0 and peak < 20 * 2**20


def test_a_few_aliases_and_merge_keys_still_work() -> None:
    """Aliases under the cap are fine; a cap of 0 refuses every alias."""
    text = "d: &d {x: 1}\ne: {<<: *d, y: 2}\n"
    assert parse_yaml(text) == {"d": {"x": 1}, "e": {"x": 1, "y": 2}}
    with pytest.raises(SpecError, match="more than 0 nodes"):
        parse_yaml(text, limits=YamlLimits(max_alias_nodes=0))


@pytest.mark.parametrize("text", ["[" * 1000 + "]" * 1000,
                                  '{"a": ' * 1000 + "1" + "}" * 1000])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(text: str) -> None:
    """YAML or JSON nested 1000 deep: a SpecError naming limits.yaml_depth."""
    with pytest.raises(SpecError, match=r"deeper than 64 levels \(limits.yaml_depth\)"):
        parse_yaml(text)


@pytest.mark.parametrize(("text", "value"), [
    ("1e6", 1e6), ("-1.5e-3", -0.0015), ("+2E3", 2000.0), ("1.0e6", 1e6), (".5", 0.5),
    ("1", 1), ("0x10", 16), ("1_000", 1000), ("1e", "1e"), ("e5", "e5"),
])
def test_yaml_12_floats(text: str, value: Any) -> None:
    """Exponents without a dot or a sign are numbers (YAML 1.2); ints stay ints."""
    got = parse_yaml(f"v: {text}")["v"]
    assert got == value and type(got) is type(value)


def test_exponent_params_are_numbers_and_overflow_is_refused_at_its_field() -> None:
    """`1e6` in a grid is the float 1000000.0; `1e309` is refused as not finite."""
    job = job_from_dict(parse_yaml("model: m:f\nparameters: {grid: {x: [1e6, 2.5]}}"),
                        base_dir=Path("."))
    assert [p.values["x"] for p in job.params] == [1e6, 2.5]
    data = parse_yaml("model: m:f\nparameters: {grid: {x: [1, 1e309]}}")
    (error,) = errors_of(data)
    assert error.startswith("parameters.grid.x[1]: expected a finite number")


# --- sizes -------------------------------------------------------------------------------------


def test_grid_size_is_counted_from_its_shape_before_expanding() -> None:
    """A 10^8 grid is refused at once, naming the field, the limit, its key and the shape."""
    grid = {n: list(range(100)) for n in "abcd"}
    started = time.perf_counter()
    (error,) = errors_of(base(parameters={"grid": grid}), SpecLimits(max_params=1_000_000))
    assert time.perf_counter() - started < 1.0
    assert error == ("parameters.grid: expected at most 1,000,000 parameter sets "
                     "(limits.max_params), got 100,000,000 (a grid of 100 x 100 x 100 x 100)")


def test_values_and_file_rows_are_counted() -> None:
    """Inline values over the limit name parameters.values."""
    values = [{"k": i} for i in range(11)]
    (error,) = errors_of(base(parameters={"values": values}), SpecLimits(max_params=10))
    assert error.startswith("parameters.values: expected at most 10 parameter sets")
    assert error.endswith("got 11")


def test_file_rows_are_counted(tmp_path: Path) -> None:
    """A params file over the limit names parameters.file and its row count."""
    (tmp_path / "p.csv").write_text("k\n" + "\n".join(map(str, range(5))) + "\n")
    (error,) = errors_of(base(parameters={"file": "p.csv"}), SpecLimits(max_params=4),
                         base_dir=tmp_path)
    assert error.startswith("parameters.file: expected at most 4 parameter sets "
                            "(limits.max_params), got 5 rows")


def test_a_params_file_over_the_byte_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A params file larger than limits.max_file_bytes is refused from its size, naming
    the field, the limit's key and the size, and no byte of it is read; one at the limit
    is read and expanded."""
    path = tmp_path / "p.csv"
    path.write_text("k\n" + "\n".join(map(str, range(100))) + "\n")
    size = path.stat().st_size
    opened: list[Path] = []
    real_open = Path.open

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    (error,) = errors_of(base(parameters={"file": "p.csv"}),
                         SpecLimits(max_file_bytes=size - 1), base_dir=tmp_path)
    assert error == (f"parameters.file: expected at most {size - 1:,} bytes "
                     f"(limits.max_file_bytes), got {size:,} bytes in 'p.csv'")
    assert path.resolve() not in opened
    job = job_from_dict(base(parameters={"file": "p.csv"}), base_dir=tmp_path,
                        limits=SpecLimits(max_file_bytes=size))
    assert job.params.total == 100


def test_a_params_file_that_grows_past_the_limit_as_it_is_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measured within the limit, then grown before it is read: what is read past the
    limit is refused as too large, not parsed."""
    path = tmp_path / "p.csv"
    path.write_text("k\n1\n2\n")
    limit = path.stat().st_size
    real_open = Path.open

    def grow_then_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path.resolve():
            with real_open(self, "a") as f:
                f.write("3\n4\n")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", grow_then_open)
    (error,) = errors_of(base(parameters={"file": "p.csv"}),
                         SpecLimits(max_file_bytes=limit), base_dir=tmp_path)
    assert error == (f"parameters.file: expected at most {limit:,} bytes "
                     f"(limits.max_file_bytes), got {limit + 4:,} bytes in 'p.csv'")


def test_replicates_and_tasks_are_bounded() -> None:
    """`replicates: 1000000000` is refused by default; params x (replicates + targets)
    over limits.max_tasks is refused with the arithmetic shown."""
    (error,) = errors_of(base(replicates=1_000_000_000))
    assert error == ("replicates: expected at most 1,000,000 replicates "
                     "(limits.max_replicates), got 1,000,000,000")
    targets = [{"name": "t", "function": "m:f"}]
    (error,) = errors_of(base(replicates=4, targets=targets), SpecLimits(max_tasks=9))
    assert error == ("parameters: expected at most 9 tasks, params x (replicates + targets) "
                     "(limits.max_tasks), got 10 (2 x (4 + 1))")


def test_run_defaults_allow_a_million_params() -> None:
    """`tidegate run`'s defaults accept a 10^6 grid (counted, not expanded here)."""
    limits = SpecLimits()
    assert limits.max_params >= 1_000_000 and limits.max_tasks >= 10_000_000


# --- names and files -----------------------------------------------------------------------


@pytest.mark.parametrize("parameters", [
    {"grid": {"a": [1], "A": [2]}},
    {"values": [{"a": 1, "A": 2}]},
])
def test_param_names_differing_only_in_case_are_refused(parameters: dict[str, Any]) -> None:
    """`a` and `A` would be one column in DuckDB: refused naming both."""
    (error,) = errors_of(base(parameters=parameters))
    assert "parameter names that differ in more than case, got 'a' and 'A'" in error


def test_file_columns_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """The same check on a params file's columns, naming their positions: a file's text
    is never echoed (its header could hold anything)."""
    (tmp_path / "p.csv").write_text("k,SECRET_x,secret_X\n1,2,3\n")
    (error,) = errors_of(base(parameters={"file": "p.csv"}), base_dir=tmp_path)
    assert error.startswith("parameters.file: expected parameter names that differ")
    assert "got columns 2 and 3" in error
    assert "secret" not in error.lower()


def test_symlinked_csv_is_read_by_its_name(tmp_path: Path) -> None:
    """A `.csv` symlink to a file of another suffix is read as CSV, not a KeyError."""
    (tmp_path / "data.txt").write_text("k\n1\n2\n")
    (tmp_path / "p.csv").symlink_to(tmp_path / "data.txt")
    job = job_from_dict(base(parameters={"file": "p.csv"}), base_dir=tmp_path)
    assert [p.values["k"] for p in job.params] == [1, 2]


# --- config -------------------------------------------------------------------------------


def test_limits_config_keys_env_and_errors() -> None:
    """limits.* come from the environment like every key, and reach the spec limits."""
    config = load_config(None, {"TIDEGATE_LIMITS__MAX_PARAMS": "50",
                                "TIDEGATE_LIMITS__YAML_DEPTH": "10"})
    limits = config.limits.spec_limits()
    assert limits.max_params == 50 and limits.yaml.max_depth == 10
    with pytest.raises(ConfigError, match="TIDEGATE_LIMITS__MAX_TASKS: expected an integer"):
        load_config(None, {"TIDEGATE_LIMITS__MAX_TASKS": "0"})


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    """A rotated token (new inode) is used; an emptied file is a ConfigError."""
    path = tmp_path / "token"
    path.write_text("one\n")
    tokens = TokenFile(load_config(None, {}, {"security.token_file": str(path)}).security)
    assert tokens.current() == "one"
    new = tmp_path / "token.new"
    new.write_text("two\n")
    new.replace(path)
    assert tokens.current() == "two"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"security\.token_file"):
        tokens.current()


# --- the API --------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Any:
    (tmp_path / "token").write_text("tok\n")
    config = load_config(None, {}, {"state_dir": str(tmp_path / "state"),
                                    "output_root": str(tmp_path / "out"),
                                    "security.token_file": str(tmp_path / "token"),
                                    "limits.max_params": 1000})
    svc = Service(config, metrics=Metrics())
    svc.queue = JobQueue(tmp_path / "jobs.sqlite")
    yield svc
    svc.queue.close()


def call(service: Service, method: str, path: str, body: bytes | None = None,
         token: str | None = "tok") -> tuple[int, Any]:
    async def main() -> tuple[int, Any]:
        server, port = make_server(service, "127.0.0.1", 0)
        client = AsyncHTTPClient()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = await client.fetch(f"http://127.0.0.1:{port}{path}", method=method,
                                   body=body, headers=headers, raise_error=False)
            return r.code, json.loads(r.body)
        finally:
            server.stop()
            client.close()

    return asyncio.run(main())


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/jobs?state=bogus", "state"),
])
def test_bad_state_query_is_400(service: Service, path: str, field: str) -> None:
    """`?state=bogus` is 400 naming the field and the states, not 500."""
    status, body = call(service, "GET", path)
    assert status == 400
    assert body["errors"][0]["field"] == field and "queued" in body["errors"][0]["expected"]


@pytest.mark.parametrize("priority", [str(2**63), str(-(2**63) - 1), "soon"])
def test_priority_out_of_range_is_400(service: Service, priority: str) -> None:
    """`?priority=` beyond a 64-bit integer (or not a number) is 400, not 500."""
    status, body = call(service, "POST", f"/v1/jobs?priority={priority}", b"{}")
    assert status == 400 and body["errors"][0]["field"] == "priority"


@pytest.mark.parametrize(("body", "needle"), [
    (BOMB.encode(), "limits.yaml_alias_nodes"),
    (("[" * 1000 + "]" * 1000).encode(), "limits.yaml_depth"),
    (json.dumps(base(parameters={"grid": {"a": list(range(100)), "b": list(range(100))}}))
     .encode(), "limits.max_params"),
])
def test_oversized_specs_are_400_naming_the_key(service: Service, body: bytes,
                                                 needle: str) -> None:
    """Alias bombs, deep nesting and grids over limits.max_params are 400."""
    status, answer = call(service, "POST", "/v1/jobs", body)
    assert status == 400 and needle in answer["error"], answer


def test_401_comes_before_the_body_is_read(service: Service) -> None:
    """A request without the token gets 401 with its body never handed to the handler:
    the token is checked in prepare(), before a streamed body is received."""
    received: list[int] = []
    from tidegate import api

    original = api._Handler.data_received

    def spy(self: Any, chunk: bytes) -> None:
        received.append(len(chunk))
        original(self, chunk)

    api._Handler.data_received = spy  # type: ignore[method-assign]
    try:
        status, _ = call(service, "POST", "/v1/jobs", b"x" * (512 * 1024), token=None)
        assert status == 401 and received == []
        status, _ = call(service, "POST", "/v1/jobs", b"x" * (2 * 2**20))
        assert status == 413 and received == []
        status, _ = call(service, "POST", "/v1/jobs", b"model: 1\n")
        assert status == 400 and received == [9]
    finally:
        api._Handler.data_received = original  # type: ignore[method-assign]


def test_reading_a_small_params_file_allocates_only_its_size(tmp_path: Path) -> None:
    """Under a 4 GiB limit a 3-row file is read without allocating the limit (a read of
    limit + 1 bytes allocates them first: a MemoryError under ulimit -v); one whose size
    says nothing (st_size 0, as in /proc) is still read to its end, up to the limit."""
    (tmp_path / "p.csv").write_text("k\n1\n2\n3\n")
    tracemalloc.start()
    try:
        job = job_from_dict(base(parameters={"file": "p.csv"}), base_dir=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert job.params.total == 3
    assert peak < 64 * 2**20
    from io import BytesIO

    from tidegate.spec import _read_at_most

    assert _read_at_most(BytesIO(b"x" * 5_000_000), 0, 10_000_000) == b"x" * 5_000_000
    assert len(_read_at_most(BytesIO(b"x" * 5_000_000), 0, 3_000_001)) == 3_000_001
