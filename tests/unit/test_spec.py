"""The job spec: loading, validation messages, param expansion, identity."""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import pytest
import yaml
from hypothesis import given, settings

from tests.strategies import grids
from tidegate.spec import (
    ID_PATTERN,
    RUN_LIMITS,
    FieldError,
    Job,
    SpecError,
    check_callables,
    job_from_dict,
    load_job,
    param_id_of,
    parse_yaml,
    replicate_seed,
    spec_json_schema,
)

GRID = {"beta": [0.1, 0.2, 0.3], "gamma": [0.05, 0.1]}
BASE: dict[str, Any] = {
    "model": "sir:simulate",
    "parameters": {"grid": GRID},
    "replicates": 3,
    "seed": 2024,
    "targets": [{"name": "incidence", "function": "sir:incidence_loss"}],
}
DROP = object()


def spec(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is DROP:
            del data[key]
        else:
            data[key] = value
    return data


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load(tmp_path: Path, data: dict[str, Any] | str) -> Job:
    return load_job(write(tmp_path, data))


def first_error(tmp_path: Path, data: dict[str, Any] | str) -> FieldError:
    with pytest.raises(SpecError) as info:
        load(tmp_path, data)
    assert info.value.errors, "a SpecError must carry at least one FieldError"
    return info.value.errors[0]


# --- a good spec ---------------------------------------------------------------------


def test_grid_expands_to_cartesian_product_in_order(tmp_path: Path) -> None:
    """A grid gives every combination, last key varying fastest."""
    job = load(tmp_path, spec())
    assert job.param_names == ["beta", "gamma"]
    assert job.param_types == {"beta": "float", "gamma": "float"}
    assert [p.values for p in job.params] == [
        {"beta": b, "gamma": g} for b in GRID["beta"] for g in GRID["gamma"]
    ]
    assert job.n_tasks == 6 * (3 + 1)


def test_param_ids_are_stable_and_distinct(tmp_path: Path) -> None:
    """Same values give the same id across loads; different values different ids."""
    first, second = load(tmp_path, spec()), load(tmp_path, spec())
    ids = [p.param_id for p in first.params]
    assert ids == [p.param_id for p in second.params]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert param_id_of({"gamma": 0.05, "beta": 0.1}) == ids[0]


def test_hashes_are_pinned() -> None:
    """param_id and seeds keep their values: a change would orphan every existing ledger."""
    assert param_id_of({"beta": 0.1, "gamma": 0.05}) == "f8af5def85e53812"
    assert replicate_seed(2024, "f8af5def85e53812", 0) == 464131211343245544


def test_seeds_are_stable_and_distinct(tmp_path: Path) -> None:
    """Seeds repeat across loads and differ across replicates and params."""
    job, again = load(tmp_path, spec()), load(tmp_path, spec())
    seeds = [s for p in job.params for s in job.seeds(p.param_id)]
    assert seeds == [s for p in again.params for s in again.seeds(p.param_id)]
    assert len(seeds) == job.n_params * 3 == len(set(seeds))
    assert all(0 <= s < 2**63 for s in seeds)
    first = next(iter(job.params)).param_id
    assert job.seeds(first)[1] == replicate_seed(2024, first, 1)


def test_values_form_equals_grid(tmp_path: Path) -> None:
    """Inline values give the same params as the equivalent grid."""
    grid_job = load(tmp_path, spec())
    values = [p.values for p in grid_job.params]
    values_job = load(tmp_path, spec(parameters={"values": values}))
    assert list(values_job.params) == list(grid_job.params)
    assert values_job.param_types == grid_job.param_types


MIXED_GRID = {
    "beta": [0.1, 0.25],
    "n": [1, 2],
    "kind": ["a", "b c"],
    "flag": [True, False],
}


def _write_param_file(path: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    elif path.suffix == ".parquet":
        pa_parquet.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_file_form_equals_grid(tmp_path: Path, suffix: str) -> None:
    """A param file (csv, parquet, jsonl) gives the same params and types as the grid."""
    grid_job = load(tmp_path, spec(parameters={"grid": MIXED_GRID}))
    (tmp_path / "data").mkdir()
    _write_param_file(tmp_path / "data" / f"params{suffix}", [p.values for p in grid_job.params])
    file_job = load(tmp_path, spec(parameters={"file": f"data/params{suffix}"}))
    assert file_job.param_types == {"beta": "float", "n": "int", "kind": "str", "flag": "bool"}
    assert list(file_job.params) == list(grid_job.params)


def test_int_and_float_unify_to_float(tmp_path: Path) -> None:
    """Ints next to floats become floats, with the param_id of the float spelling."""
    mixed = load(tmp_path, spec(parameters={"grid": {"beta": [1, 0.5]}}))
    floats = load(tmp_path, spec(parameters={"grid": {"beta": [1.0, 0.5]}}))
    assert mixed.param_types == {"beta": "float"}
    assert next(iter(mixed.params)).values == {"beta": 1.0}
    assert isinstance(next(iter(mixed.params)).values["beta"], float)
    assert [p.param_id for p in mixed.params] == [p.param_id for p in floats.params]
    values = load(tmp_path, spec(parameters={"values": [{"beta": 1}, {"beta": 0.5}]}))
    assert list(values.params) == list(floats.params)


def test_ints_stay_ints_and_whole_floats_are_the_same_params(tmp_path: Path) -> None:
    """A name whose values are all ints stays int; 1 and 1.0 are one param (one id), as
    releases before canonical ids did not have it (their typed ids, kept for their
    outputs, differ)."""
    job = load(tmp_path, spec(parameters={"grid": {"n": [1, 2]}}))
    assert job.param_types == {"n": "int"}
    assert job.param_fits == {"n": frozenset({"int", "float"})}
    first = next(iter(job.params))
    assert first.param_id == param_id_of({"n": 1.0})
    assert param_id_of({"n": 1}, typed=True) != param_id_of({"n": 1.0}, typed=True)
    assert next(iter(job.params.typed_ids())).param_id == param_id_of({"n": 1}, typed=True)
    floats = load(tmp_path, spec(parameters={"grid": {"n": [1.0, 2.0, 2.5]}}))
    assert floats.param_fits == {"n": frozenset({"float"})}
    whole = load(tmp_path, spec(parameters={"grid": {"n": [1.0, 2.0, 3]}}))
    assert (whole.param_types, whole.param_fits) == ({"n": "float"},
                                                     {"n": frozenset({"int", "float"})})
    assert [p.param_id for p in whole.params][:2] == [p.param_id for p in job.params]


def test_an_int_too_large_for_a_float_is_refused_beside_floats(tmp_path: Path) -> None:
    """2**53 + 1 next to a float would become 2**53 (another param): refused, named."""
    with pytest.raises(SpecError) as err:
        load(tmp_path, spec(parameters={"grid": {"n": [0.5, 2**53 + 1]}}))
    (e,) = err.value.errors
    assert e.field == "parameters.grid.n[1]" and "2**53" in e.expected
    big = load(tmp_path, spec(parameters={"grid": {"n": [1, 2**53 + 1]}}))
    assert big.param_fits == {"n": frozenset({"int"})}


def test_defaults(tmp_path: Path) -> None:
    """Omitted fields take their documented defaults."""
    job = load(tmp_path, {"model": "sir:simulate", "parameters": {"values": [{"beta": 0.1}]}})
    s = job.spec
    assert (s.replicates, s.seed, s.targets, s.outputs, s.output) == (1, 0, [], "all", None)
    assert (s.batch.size, s.batch.min, s.batch.max) == (None, 1, 10000)
    assert s.code_paths == ["."]
    assert job.code_paths == [tmp_path.resolve()]
    assert job.n_tasks == 1


def test_derived_job_id_and_default_output(tmp_path: Path) -> None:
    """Without job_id the id is <module>-<fingerprint[:8]> and output is results/<id>."""
    job = load(tmp_path, spec(model="models.sir_v2:simulate"))
    assert job.job_id == f"sir_v2-{job.fingerprint[:8]}"
    assert job.output_dir == tmp_path.resolve() / "results" / job.job_id
    assert re.fullmatch(ID_PATTERN, job.job_id)


def test_output_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output override wins (relative to CWD), then spec.output, then output_root/job_id."""
    path = write(tmp_path, spec(job_id="demo", output="out/demo"))
    assert load_job(path).output_dir == tmp_path.resolve() / "out" / "demo"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_job(path, output="here").output_dir == (tmp_path / "cwd" / "here").resolve()
    assert load_job(path, output=tmp_path / "abs").output_dir == tmp_path.resolve() / "abs"
    root_only = write(tmp_path, spec(job_id="demo"), "root.yaml")
    assert load_job(root_only, output_root=tmp_path / "root").output_dir == (
        tmp_path.resolve() / "root" / "demo"
    )


def test_fingerprint_ignores_where_and_how_but_not_what(tmp_path: Path) -> None:
    """job_id, code_paths, output and batch leave the fingerprint alone; the seed does not."""
    base = load(tmp_path, spec()).fingerprint
    moved = spec(job_id="x", code_paths=["src"], output="elsewhere", batch={"size": 7})
    assert load(tmp_path, moved).fingerprint == base
    assert load(tmp_path, spec(seed=1)).fingerprint != base
    assert load(tmp_path, spec(outputs=["prevalence"])).fingerprint != base
    job = load(tmp_path, spec())
    identity = job.identity()
    assert set(identity) == {
        "model", "param_names", "replicates", "seed", "targets", "outputs"
    }
    assert json.loads(json.dumps(identity)) == identity
    # The values are not the job's identity: a grown grid is the same job (and the same
    # derived job id); a new parameter name is another.
    grown = load(tmp_path, spec(parameters={"grid": {**GRID, "beta": [*GRID["beta"], 0.4]}}))
    assert (grown.fingerprint, grown.job_id) == (base, load(tmp_path, spec()).job_id)
    renamed = load(tmp_path, spec(parameters={"grid": {**GRID, "delta": [1]}}))
    assert renamed.fingerprint != base
    swapped = load(tmp_path, spec(parameters={"grid": {"gamma": GRID["gamma"],
                                                       "beta": GRID["beta"]}}))
    assert swapped.fingerprint == base


def test_a_grid_is_never_expanded_to_be_counted_or_identified(tmp_path: Path) -> None:
    """A grid of 10^12 params (limits raised) loads with its size, fingerprint and first
    param at once: nothing walks the product until the params are asked for."""
    axes = {f"x{i}": list(range(100)) for i in range(6)}
    limits = replace(RUN_LIMITS, max_params=2 * 10**12, max_tasks=10**14)
    job = job_from_dict(spec(parameters={"grid": axes}), base_dir=tmp_path, limits=limits)
    assert job.n_params == 10**12
    assert job.n_tasks == 10**12 * (3 + 1)
    first = next(iter(job.params))
    assert first.values == dict.fromkeys(axes, 0)
    again = job_from_dict(spec(parameters={"grid": axes}), base_dir=tmp_path, limits=limits)
    assert again.fingerprint == job.fingerprint
    grown = {**axes, "x5": list(range(101))}
    other = job_from_dict(spec(parameters={"grid": grown}), base_dir=tmp_path, limits=limits)
    assert other.fingerprint == job.fingerprint  # values grew: the same job


def test_spec_json_schema_lists_the_fields() -> None:
    """The JSON schema documents every top-level field."""
    schema = spec_json_schema()
    assert set(schema["properties"]) == {
        "job_id", "model", "code_paths", "parameters", "replicates", "seed", "targets",
        "outputs", "output", "batch", "on_error", "sim_timeout_s",
    }
    assert schema["additionalProperties"] is False


# --- malformed specs ----------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
TARGET = {"name": "t", "function": "sir:loss"}

MALFORMED = [
    pytest.param(spec(replicas=2), "replicas", "known fields (job_id, model", "unknown field",
                 id="unknown-top-level"),
    pytest.param(spec(batch={"min": 1, "maxx": 5}), "batch.maxx", "size, min, max",
                 "unknown field", id="unknown-in-batch"),
    pytest.param(spec(targets=[{**TARGET, "fn": "x"}]), "targets[0].fn", "name, function",
                 "unknown field", id="unknown-in-target"),
    pytest.param(spec(parameters={"grids": GRID}), "parameters.grids", "grid, values, file",
                 "unknown field", id="unknown-in-parameters"),
    pytest.param(spec(replicates="three"), "replicates", "an integer", "'three' (str)",
                 id="replicates-string"),
    pytest.param(spec(replicates=0), "replicates", "an integer >= 1", "0", id="replicates-0"),
    pytest.param(spec(replicates=True), "replicates", "an integer", "true (bool)",
                 id="replicates-bool"),
    pytest.param(spec(replicates=2.5), "replicates", "an integer", "2.5 (float)",
                 id="replicates-float"),
    pytest.param(spec(seed=-1), "seed", "an integer >= 0", "-1", id="seed-negative"),
    pytest.param(spec(parameters={"grid": {}}), "parameters.grid", "non-empty mapping", "{}",
                 id="grid-empty"),
    pytest.param(spec(parameters={"grid": {"beta": []}}), "parameters.grid.beta",
                 "non-empty list", "[]", id="grid-key-empty-list"),
    pytest.param(spec(parameters={"grid": {"beta": 0.1}}), "parameters.grid.beta", "a list",
                 "0.1 (float)", id="grid-value-not-list"),
    pytest.param(spec(parameters={"values": []}), "parameters.values", "non-empty list", "[]",
                 id="values-empty"),
    pytest.param(spec(parameters={"values": [{"beta": 1}, 3]}), "parameters.values[1]",
                 "a mapping", "3 (int)", id="values-item-not-mapping"),
    pytest.param(spec(parameters={"values": [{"beta": 1, "gamma": 2}, {"beta": 1, "delta": 2}]}),
                 "parameters.values[1]", "names of parameters.values[0] (beta, gamma)",
                 "beta, delta", id="values-different-names"),
    pytest.param(spec(parameters={"values": [{"beta": NAN}]}), "parameters.values[0].beta",
                 "a finite number", "nan", id="value-nan"),
    pytest.param(spec(parameters={"grid": {"beta": [0.1, INF]}}), "parameters.grid.beta[1]",
                 "a finite number", "inf", id="grid-value-inf"),
    pytest.param(spec(parameters={"values": [{"beta": None}]}), "parameters.values[0].beta",
                 "bool, int, float or string", "null", id="value-null"),
    pytest.param(spec(parameters={"values": [{"beta": 2**70}]}), "parameters.values[0].beta",
                 "64 bits", str(2**70), id="value-int-too-large"),
    pytest.param(spec(parameters={"values": [{"b": 1}, {"b": 2}, {"b": 1.0}]}),
                 "parameters.values[2]", "unique parameter sets",
                 "a duplicate of parameters.values[0]", id="values-duplicate"),
    pytest.param(spec(parameters={"grid": {"beta": [0.1, 0.2, 0.1]}}), "parameters.grid.beta[2]",
                 "unique values", "a duplicate of parameters.grid.beta[0]", id="grid-duplicate"),
    pytest.param(spec(parameters={"grid": GRID, "values": [{"beta": 1}]}), "parameters",
                 "exactly one of grid, values, file or search", "grid and values", id="two-forms"),
    pytest.param(spec(parameters={}), "parameters", "exactly one of grid, values, file or search",
                 "none of them", id="no-form"),
    pytest.param(spec(parameters=DROP), "parameters", "one of grid, values, file or search",
                 "nothing", id="parameters-missing"),
    pytest.param(spec(model=DROP), "model", "'module:function'", "nothing", id="model-missing"),
    pytest.param(spec(model="sir"), "model", "'module:function'", "'sir'", id="model-no-colon"),
    pytest.param(spec(model=3), "model", "a string", "3 (int)", id="model-not-string"),
    pytest.param(spec(job_id="has space"), "job_id", "letters, digits", "'has space'",
                 id="job-id-bad"),
    pytest.param(spec(job_id="x" * 65), "job_id", "1-64", "'xxx", id="job-id-too-long"),
    pytest.param(spec(targets=[TARGET, {**TARGET, "function": "sir:other"}]), "targets[1].name",
                 "a unique target name", "targets[0]", id="targets-duplicate-name"),
    pytest.param(spec(targets=[{"name": "1st", "function": "sir:loss"}]), "targets[0].name",
                 "not starting with a digit", "'1st'", id="target-name-bad"),
    pytest.param(spec(targets=[{"name": "t", "function": "sir"}]), "targets[0].function",
                 "'module:function'", "'sir'", id="target-function-bad"),
    pytest.param(spec(outputs=[]), "outputs", "non-empty list", "[]", id="outputs-empty"),
    pytest.param(spec(outputs="some"), "outputs", "'all' or 'none'", "'some'",
                 id="outputs-unknown-keyword"),
    pytest.param(spec(outputs=["a", "a"]), "outputs[1]", "unique output names", "outputs[0]",
                 id="outputs-duplicate"),
    pytest.param(spec(outputs=["ok", "bad/name"]), "outputs[1]", "a name of 1-64", "'bad/name'",
                 id="outputs-name-bad"),
    pytest.param(spec(outputs=3), "outputs", "'all', 'none' or a list", "3 (int)",
                 id="outputs-wrong-type"),
    pytest.param(spec(batch={"min": 5, "max": 3}), "batch.max", ">= batch.min (5)", "3",
                 id="batch-min-above-max"),
    pytest.param(spec(batch={"size": 20, "max": 10}), "batch.size", "[1, 10]", "20",
                 id="batch-size-outside-range"),
    pytest.param(spec(batch={"size": 0}), "batch.size", "an integer >= 1", "0",
                 id="batch-size-zero"),
    pytest.param(spec(batch=5), "batch", "a mapping", "5 (int)", id="batch-not-mapping"),
    pytest.param(spec(parameters={"file": "params.txt"}), "parameters.file",
                 ".csv, .parquet or .jsonl", "'params.txt'", id="file-bad-extension"),
    pytest.param(spec(parameters={"file": "nope.csv"}), "parameters.file", "an existing file",
                 "nope.csv", id="file-missing"),
    pytest.param(spec(parameters={"grid": {"beta gamma": [1]}}), "parameters.grid['beta gamma']",
                 "parameter name", "'beta gamma'", id="param-name-bad"),
    pytest.param(spec(parameters={"grid": {"id": [1]}}), "parameters.grid.id", "other than 'id'",
                 "'id'", id="param-name-reserved"),
    pytest.param(spec(parameters={"values": [{"beta": 0.1}, {"beta": "x"}]}),
                 "parameters.values[1].beta", "a number (the type in parameters.values[0].beta)",
                 "'x' (str)", id="str-mixed-with-float"),
    pytest.param(spec(parameters={"grid": {"on": [True, 0.5]}}), "parameters.grid.on[1]",
                 "true or false", "0.5 (float)", id="bool-mixed-with-float"),
    pytest.param("- 1\n- 2\n", "<top level>", "a mapping", "[1, 2] (list)", id="top-level-list"),
    pytest.param("", "<top level>", "a mapping", "nothing", id="empty-document"),
    pytest.param("model: [sir\nseed: 1\n", "<yaml>", "valid YAML", "line", id="yaml-syntax"),
    pytest.param("model: sir:simulate\nseed: 1\nseed: 2\n", "<yaml>", "valid YAML",
                 "duplicate key 'seed'", id="yaml-duplicate-key"),
    pytest.param("model: sir:simulate\nparameters: {values: [{beta: .nan}]}\n",
                 "parameters.values[0].beta", "a finite number", "nan", id="yaml-nan"),
    pytest.param("model: sir:simulate\nparameters: {values: [{d: 2024-01-01}]}\n",
                 "parameters.values[0].d", "bool, int, float or string", "(date)",
                 id="yaml-date-value"),
]


@pytest.mark.parametrize(("data", "field", "expected", "got"), MALFORMED)
def test_malformed_spec_names_the_field(
    tmp_path: Path, data: dict[str, Any] | str, field: str, expected: str, got: str
) -> None:
    """A malformed spec raises SpecError whose first error names the field, expected, got."""
    error = first_error(tmp_path, data)
    assert error.field == field
    assert expected in error.expected
    assert got in error.got


def test_spec_error_reports_every_problem(tmp_path: Path) -> None:
    """All field problems are reported at once, one per line, under the spec's path."""
    path = write(tmp_path, spec(replicates=0, seed=-1, model=DROP))
    with pytest.raises(SpecError) as info:
        load_job(path)
    fields = [e.field for e in info.value.errors]
    assert fields == ["model", "replicates", "seed"]
    text = str(info.value)
    assert text.startswith(f"{path}: model: expected ")
    assert "\n  - replicates: expected an integer >= 1, got 0" in text
    assert "\n  - seed: expected an integer >= 0, got -1" in text


def test_spec_error_default_message() -> None:
    """A SpecError without field errors says its docstring."""
    assert str(SpecError([], "x.yaml")) == "x.yaml: The job spec is not valid."
    assert str(FieldError("seed", "an integer", "'a' (str)")) == (
        "seed: expected an integer, got 'a' (str)"
    )


def test_missing_file_names_the_resolved_path(tmp_path: Path) -> None:
    """A missing param file is reported with the path it was looked for at."""
    error = first_error(tmp_path, spec(parameters={"file": "sub/../nope.csv"}))
    assert str(tmp_path.resolve() / "nope.csv") in error.got


def test_missing_spec_file(tmp_path: Path) -> None:
    """A spec path that does not exist is a SpecError, not an OSError."""
    with pytest.raises(SpecError) as info:
        load_job(tmp_path / "absent.yaml")
    assert info.value.errors[0].field == "<file>"


FILE_CASES = [
    pytest.param("params.csv", "beta\n", "parameters.file", "at least one row", "no rows",
                 id="csv-header-only"),
    pytest.param("params.jsonl", "", "parameters.file", "at least one row", "no rows",
                 id="jsonl-empty"),
    pytest.param("params.csv", "beta,gamma\n0.1,\n0.2,0.5\n", "parameters.file[row 0, column 2]",
                 "bool, int, float or string", "null", id="csv-missing-value"),
    pytest.param("params.csv", "beta,when\n0.1,2024-01-01\n", "parameters.file",
                 "bool, integer, float or string", "column 2 of type", id="csv-date-column"),
    pytest.param("params.csv", "beta gamma\n0.1\n", "parameters.file", "named like parameters",
                 "column 1 of the header", id="csv-bad-column-name"),
    pytest.param("params.csv", "id\n1\n", "parameters.file", "not id", "column 1 of the header",
                 id="csv-reserved-column"),
    pytest.param("params.csv", "beta\n0.1\n0.2\n0.1\n", "parameters.file[row 2]",
                 "unique parameter sets", "a duplicate of parameters.file[row 0]",
                 id="csv-duplicate-row"),
    pytest.param("params.jsonl", '{"b": 1}\n{"b": "x"}\n', "parameters.file", "readable",
                 "not readable as such a file (at row 1)", id="jsonl-mixed-types"),
    pytest.param("params.jsonl", '{"b": 1.5}\n{"b": nan}\n', "parameters.file", "readable",
                 "params.jsonl", id="jsonl-invalid"),
    pytest.param("params.parquet", "not parquet", "parameters.file", "a readable .parquet file",
                 "params.parquet", id="parquet-corrupt"),
]


@pytest.mark.parametrize(("name", "content", "field", "expected", "got"), FILE_CASES)
def test_malformed_param_file_names_the_field(
    tmp_path: Path, name: str, content: str, field: str, expected: str, got: str
) -> None:
    """A bad param file raises SpecError naming parameters.file or its row."""
    (tmp_path / name).write_text(content)
    error = first_error(tmp_path, spec(parameters={"file": name}))
    assert error.field == field
    assert expected in error.expected
    assert got in error.got


# --- check_callables -----------------------------------------------------------------------

MODEL_SOURCE = """
def simulate(params, seed):
    return {}

def loss(returns):
    return 0.0

NOT_CALLABLE = 3
"""


@pytest.fixture
def model_module(tmp_path: Path):
    """A uniquely named model module in tmp_path; sys.path and sys.modules restored after."""
    name = f"tg_model_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(MODEL_SOURCE)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    importlib.invalidate_caches()
    yield name
    sys.path[:] = saved_path
    for module in set(sys.modules) - saved_modules:
        del sys.modules[module]


def _callable_job(tmp_path: Path, model: str, target: str, code_paths: list[str]) -> Job:
    return load(tmp_path, spec(model=model, code_paths=code_paths,
                               targets=[{"name": "t", "function": target}]))


def test_check_callables_accepts_importable_callables(tmp_path: Path, model_module: str) -> None:
    """A model and targets importable from the code paths pass."""
    job = _callable_job(tmp_path, f"{model_module}:simulate", f"{model_module}:loss", ["."])
    check_callables(job)
    assert str(tmp_path.resolve()) in sys.path


@pytest.mark.parametrize(
    ("model", "target", "code_paths", "field", "got"),
    [
        pytest.param("no_such_module_tg:simulate", "{m}:loss", ["."], "model",
                     "ModuleNotFoundError", id="missing-module"),
        pytest.param("{m}:simulat", "{m}:loss", ["."], "model",
                     "AttributeError: module '{m}' has no attribute 'simulat'",
                     id="missing-function"),
        pytest.param("{m}:simulate", "{m}:NOT_CALLABLE", ["."], "targets[0].function",
                     "TypeError", id="not-callable"),
        pytest.param("{m}:simulate", "{m}:loss", [".", "missing_dir"], "code_paths[1]",
                     "'missing_dir'", id="code-path-missing"),
    ],
)
def test_check_callables_names_the_field(
    tmp_path: Path, model_module: str, model: str, target: str, code_paths: list[str],
    field: str, got: str,
) -> None:
    """An unimportable model or target, or a missing code path, is a SpecError naming it."""
    job = _callable_job(tmp_path, model.format(m=model_module), target.format(m=model_module),
                        code_paths)
    with pytest.raises(SpecError) as info:
        check_callables(job)
    error = info.value.errors[0]
    assert error.field == field
    assert got.format(m=model_module) in error.got
    assert info.value.source == job.source


# --- properties --------------------------------------------------------------------------------


class _QuotedDumper(yaml.SafeDumper):
    pass


_QuotedDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style='"')
)


@settings(max_examples=150, deadline=None)
@given(grid=grids)
def test_any_grid_expands_deterministically(grid: dict[str, list[Any]]) -> None:
    """Any grid of distinct values gives prod(lengths) params, distinct ids, the same twice."""
    # Every string double-quoted: PyYAML's dumper writes YAML 1.1 and leaves a string such
    # as '0E0' bare, which the spec's YAML 1.2 reader rightly takes for a number.
    text = yaml.dump({"model": "m:f", "parameters": {"grid": grid}}, Dumper=_QuotedDumper)
    first = job_from_dict(parse_yaml(text), base_dir=Path("/"))
    again = job_from_dict(parse_yaml(text), base_dir=Path("/"))
    ids = [p.param_id for p in first.params]
    assert len(ids) == math.prod(len(v) for v in grid.values())
    assert len(set(ids)) == len(ids)
    assert list(first.params) == list(again.params)
    assert first.fingerprint == again.fingerprint
    assert list(first.params)[-1].values == {k: v[-1] for k, v in grid.items()}


# --- path fields the file system would refuse ---------------------------------------------

BAD_PATHS = [
    ("a\x00b", "a NUL byte at index 1"),
    ("x" * 300, "a component of 300 bytes"),
    ("results/" + "é" * 128, "a component of 256 bytes"),  # 128 characters, 256 bytes
    ("x" * 5000, "5,000 bytes"),
]


@pytest.mark.parametrize(("value", "why"), BAD_PATHS)
@pytest.mark.parametrize("where", ["output", "code_paths", "parameters.file"])
def test_unusable_paths_are_field_errors(tmp_path: Path, where: str, value: str,
                                         why: str) -> None:
    """A NUL byte or a name past NAME_MAX/PATH_MAX names the field, what a path must be
    and a shortened echo of what came, both in the model and in the daemon's pre-check."""
    from tidegate.spec import check_path_fields

    if where == "output":
        data, field = spec(output=value), "output"
    elif where == "code_paths":
        data, field = spec(code_paths=[".", value]), "code_paths[1]"
    else:
        data, field = spec(parameters={"file": value}), "parameters.file"
    for check in (lambda: load(tmp_path, data), lambda: check_path_fields(data)):
        with pytest.raises(SpecError) as info:
            check()
        [error] = info.value.errors
        assert error.field == field
        assert "without NUL bytes" in error.expected and "255 bytes" in error.expected
        assert why in error.got
        assert len(error.got) < 120  # the echo is cut short


def test_paths_at_the_limits_are_accepted(tmp_path: Path) -> None:
    """255 bytes a component is allowed: the check is the file system's, not tighter."""
    from tidegate.spec import check_path_fields

    data = spec(output="x" * 255, code_paths=["."])
    check_path_fields(data)
    assert load(tmp_path, data).output_dir.name == "x" * 255


def test_run_output_flag_is_checked_too(tmp_path: Path) -> None:
    """`tidegate run --output` with an over-long name is a field error naming the flag."""
    with pytest.raises(SpecError) as info:
        load_job(write(tmp_path, spec()), output=tmp_path / ("o" * 256))
    assert info.value.errors[0].field == "--output"
