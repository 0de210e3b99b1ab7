"""The job spec: YAML in, a validated and expanded ``Job`` out.

Every problem becomes a ``FieldError`` that names the field, what was expected and what
came, so a user who mistypes a spec reads that instead of a traceback. Structure is
checked by the pydantic models; what needs all params at once (same names, one type per
name, no duplicates) and param files are checked while expanding.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pa_parquet
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from tidegate import paramfile, simreturn, validation
from tidegate.knobs import BatchSpec
from tidegate.params import GridSource, ListSource, Param, ParamSource, Scalar, param_id_of
from tidegate.validation import (
    ERROR_TYPE,
    ErrorTranslator,
    FieldError,
    ValidationFailed,
    YamlLimits,
)
from tidegate.validation import invalid as _invalid
from tidegate.validation import show as _show

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_PATTERN = simreturn.NAME_PATTERN  # targets and outputs: directory names
PARAM_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # becomes the Parquet column param_<name>
CALLABLE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
PARAM_FILE_SUFFIXES = (".csv", ".parquet", ".jsonl")


# A param named "id" would be stored as the column param_id, which is tidegate's own.
_RESERVED_PARAM_NAMES = frozenset({"id"})
_INT64 = 2**63
_PATTERN_TEXT = {
    ID_PATTERN: "an id of 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
    NAME_PATTERN: simreturn.NAME_TEXT,
    PARAM_NAME_PATTERN: "a parameter name of letters, digits and '_', not starting with a digit",
    CALLABLE_PATTERN: "a callable reference 'module:function'",
}


# --- errors ----------------------------------------------------------------------------


class SpecError(ValidationFailed):
    """The job spec is not valid."""

    default_source = "job spec"


# --- limits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecLimits:
    """How large a job may be, checked from the spec's shape before anything is expanded:
    a grid's size is the product of its list lengths, inline values and file rows are
    counted as read. The defaults are `tidegate run`'s; the daemon's come from its config
    (``limits:``), each field's key named in its error."""

    max_params: int = 10_000_000
    max_replicates: int = 1_000_000
    max_tasks: int = 100_000_000  # params x (replicates + targets)
    # A params file is read whole before it is parsed: its size is checked first.
    max_file_bytes: int = 4 * 2**30
    yaml: YamlLimits = dataclass_field(default_factory=YamlLimits)


RUN_LIMITS = SpecLimits()


def _too_large(field: str, what: str, limit: int, key: str, got: str) -> SpecError:
    return SpecError([FieldError(field, f"at most {limit:,} {what} ({key})", got)])


def _check_size(spec: JobSpec, n_params: int, field: str, shape: str, limits: SpecLimits) -> None:
    """Params and tasks within ``limits``, from the count alone."""
    if n_params > limits.max_params:
        raise _too_large(field, "parameter sets", limits.max_params, "limits.max_params",
                         f"{n_params:,}{shape}")
    tasks = n_params * (spec.replicates + len(spec.targets))
    if tasks > limits.max_tasks:
        raise _too_large(
            "parameters", "tasks, params x (replicates + targets)", limits.max_tasks,
            "limits.max_tasks",
            f"{tasks:,} ({n_params:,} x ({spec.replicates} + {len(spec.targets)}))",
        )


def _case_collision(names: Sequence[str], field: str) -> FieldError | None:
    """Two param names that differ only in case: the database views cannot tell them
    apart (param_a and param_A are one column in DuckDB). Names read from a params file
    are its text, never echoed: the columns' positions are."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        j = seen.setdefault(name.lower(), i)
        if j != i:
            got = (f"columns {j + 1} and {i + 1}" if field.startswith("parameters.file")
                   else f"{names[j]!r} and {name!r}")
            return FieldError(field, "parameter names that differ in more than case", got)
    return None


class CallableRefused(SpecError):
    """A model or target reference whose attribute path leaves its module (the daemon
    answers 403: the allowlist applies to the whole reference)."""


# --- the models --------------------------------------------------------------------------


def _check_param_name(name: str) -> str:
    if name in _RESERVED_PARAM_NAMES:
        raise _invalid(
            "", "a parameter name other than 'id' (tidegate writes param_id)", repr(name)
        )
    return name


def _value_problem(value: Any) -> str | None:
    """What a param value should have been, or None when it is fine."""
    if isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else "an integer that fits in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "a finite number"
    return "a bool, int, float or string value"


def _check_value(value: Any) -> Any:
    problem = _value_problem(value)
    if problem is not None:
        raise _invalid("", problem)
    return value


ParamName = Annotated[
    str, StringConstraints(pattern=PARAM_NAME_PATTERN), AfterValidator(_check_param_name)
]
ParamValue = Annotated[
    Any,
    AfterValidator(_check_value),
    WithJsonSchema({"type": ["boolean", "integer", "number", "string"]}),
]
CallableRef = Annotated[str, StringConstraints(pattern=CALLABLE_PATTERN)]


# Limits of the file system, checked here so that a path the kernel would refuse (a NUL
# byte ends a C string; ENAMETOOLONG past NAME_MAX/PATH_MAX) is a field error, not an
# exception from deep inside resolve(), mkdir() or stat().
MAX_NAME_BYTES = 255  # NAME_MAX on Linux and macOS
MAX_PATH_BYTES = 4095  # PATH_MAX less the NUL
PATH_TEXT = (
    f"a path without NUL bytes, each component at most {MAX_NAME_BYTES} bytes and the "
    f"whole at most {MAX_PATH_BYTES} bytes (UTF-8)"
)


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot be a path on this file system, or None."""
    if "\x00" in value:
        return f"a NUL byte at index {value.index(chr(0))}"
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON \ud800 escape
        return "not encodable as UTF-8"
    if len(data) > MAX_PATH_BYTES:
        return f"{len(data):,} bytes"
    longest = max(data.split(b"/"), key=len)
    if len(longest) > MAX_NAME_BYTES:
        return f"a component of {len(longest):,} bytes"
    return None


def _path_text(value: str) -> str:
    problem = path_problem(value)
    if problem is not None:
        raise _invalid("", PATH_TEXT, f"{_show(value)} ({problem})")
    return value


PathText = Annotated[str, AfterValidator(_path_text)]


def check_path_fields(data: Mapping[str, Any], source: str = "job spec") -> None:
    """The path fields of a raw spec (output, code_paths, parameters.file) as the model
    checks them, for a caller that touches them before validating the whole spec (the
    daemon resolves code_paths against its code roots first)."""
    fields: list[tuple[str, Any]] = [("output", data.get("output"))]
    paths = data.get("code_paths")
    if isinstance(paths, list):
        fields += [(f"code_paths[{i}]", p) for i, p in enumerate(paths)]
    parameters = data.get("parameters")
    if isinstance(parameters, dict):
        fields.append(("parameters.file", parameters.get("file")))
    errors = []
    for field, value in fields:
        problem = path_problem(value) if isinstance(value, str) else None
        if problem is not None:
            errors.append(FieldError(field, PATH_TEXT, f"{_show(value)} ({problem})"))
    if errors:
        raise SpecError(errors, source)
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]

# outputs is a keyword or a list; the tags pick the branch so that an error reports that
# branch only, and _field_error drops them from the location.
_KEYWORD, _NAMES, _BREAKER = "<keyword>", "<names>", "<breaker>"
_RANGE, _CHOICES = "<range>", "<choices>"  # a search dimension
_FLOAT, _INT = "<float>", "<int>"  # a range's bound
_UNION_TAGS = frozenset({_KEYWORD, _NAMES, _BREAKER, _RANGE, _CHOICES, _FLOAT, _INT})
Outputs = Annotated[
    Annotated[Literal["all", "none"], Tag(_KEYWORD)]
    | Annotated[list[Name], Field(min_length=1), Tag(_NAMES)],
    Discriminator(
        lambda v: _KEYWORD if isinstance(v, str) else _NAMES if isinstance(v, list) else None,
        custom_error_type=ERROR_TYPE,
        custom_error_message="expected {expected}",
        custom_error_context={"field": "", "expected": "'all', 'none' or a list of names"},
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BreakerSpec(_Strict):
    """The circuit breaker of ``on_error``: stop the job when its first
    ``stop_after_first`` completed params all failed, or once more than ``max_failed``
    params failed (null: no such limit)."""

    stop_after_first: StrictInt = Field(
        10, ge=1, description="stop if this many params completed first and all failed")
    max_failed: StrictInt | None = Field(
        None, ge=0, description="stop once more params than this failed; null: no limit")


# on_error is the keyword "continue" or a breaker mapping; tagged like outputs.
OnError = Annotated[
    Annotated[Literal["continue"], Tag(_KEYWORD)] | Annotated[BreakerSpec, Tag(_BREAKER)],
    Discriminator(
        lambda v: (_KEYWORD if isinstance(v, str)
                   else _BREAKER if isinstance(v, dict | BreakerSpec) else None),
        custom_error_type=ERROR_TYPE,
        custom_error_message="expected {expected}",
        custom_error_context={
            "field": "",
            "expected": "'continue' or a mapping {stop_after_first: N, max_failed: N}",
        },
    ),
]


class TargetSpec(_Strict):
    name: Name = Field(description=_PATTERN_TEXT[NAME_PATTERN])
    function: CallableRef = Field(description="a callable reference 'module:function'")


# Tagged by the value's type, so that a bound that is neither is one error at its field,
# not one per branch ("low.float: ..., low.int: ...").
Bound = Annotated[
    Annotated[float, Field(allow_inf_nan=False, strict=True), Tag(_FLOAT)]
    | Annotated[StrictInt, Tag(_INT)],
    Discriminator(
        lambda v: _INT if type(v) is int else _FLOAT if type(v) is float else None,
        custom_error_type=ERROR_TYPE,
        custom_error_message="expected {expected}",
        custom_error_context={"field": "", "expected": "a number"},
    ),
]
# Optional, so untagged: the tagged union's context dict cannot be hashed into a Union.
_Step = Annotated[float, Field(allow_inf_nan=False, strict=True)] | StrictInt | None


class RangeSpec(_Strict):
    """A search dimension of numbers between ``low`` and ``high`` (both included):
    floats unless ``type: int``; ``log`` samples the logarithm uniformly."""

    low: Bound = Field(description="the smallest value (a number)")
    high: Bound = Field(description="the largest value (a number above low)")
    type: Literal["float", "int"] = Field("float", description="float (default) or int")
    log: StrictBool = Field(False, description="sample log(value) uniformly; low must be > 0")
    step: _Step = Field(None, gt=0, description="a grid step from low; not with log")

    @model_validator(mode="after")
    def _ordered(self) -> RangeSpec:
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                if v is not None and not (isinstance(v, int) or float(v).is_integer()):
                    raise _invalid(name, "a whole number (type: int)", repr(v))
                if v is not None and not -_INT64 <= v < _INT64:
                    raise _invalid(name, "an integer that fits in 64 bits", repr(v))
        if not self.low < self.high:
            raise _invalid("high", f"a number above low ({self.low!r})", repr(self.high))
        if not math.isfinite(float(self.high) - float(self.low)):  # the sampler's width
            raise _invalid("high", f"high - low to be a finite float (low is {self.low!r})",
                           repr(self.high))
        if self.log and self.low <= 0:
            raise _invalid("low", "a number above 0 (log: true)", repr(self.low))
        if self.log and self.step is not None:
            raise _invalid("step", "no step with log: true", repr(self.step))
        return self


class ChoicesSpec(_Strict):
    """A search dimension of a few values, none ordered."""

    choices: list[ParamValue] = Field(
        min_length=1, max_length=10_000, description="a list of bool, int, float or string values")


# A dimension is a range or a list of choices, told apart by their keys.
Dimension = Annotated[
    Annotated[RangeSpec, Tag(_RANGE)] | Annotated[ChoicesSpec, Tag(_CHOICES)],
    Discriminator(
        lambda v: (_CHOICES if isinstance(v, ChoicesSpec) or (isinstance(v, dict)
                                                              and "choices" in v)
                   else _RANGE if isinstance(v, dict | RangeSpec) else None),
        custom_error_type=ERROR_TYPE,
        custom_error_message="expected {expected}",
        custom_error_context={
            "field": "",
            "expected": "a mapping {low, high} (with type: int, log: true or step: N "
            "if wanted) or {choices: [...]}",
        },
    ),
]
SAMPLERS = ("tpe", "random", "cmaes")
MAX_TRIALS = 1_000_000


class SearchSpec(_Strict):
    """A calibration: trials asked from a sampler as slots free up, each a param with
    the spec's replicates and targets; ``objective``'s loss is minimised."""

    space: dict[ParamName, Dimension] = Field(
        min_length=1, max_length=1000, description="name -> {low, high} or {choices}")
    objective: Name = Field(description="the name of the target whose loss is minimised")
    trials: StrictInt = Field(ge=1, le=MAX_TRIALS, description="parameter sets in all")
    sampler: Literal["tpe", "random", "cmaes"] = Field(
        "tpe", description="tpe, random or cmaes (float ranges only; needs cmaes)")
    seed: StrictInt | None = Field(None, ge=0, description="the sampler's; null: the job's")
    parallel: StrictInt | None = Field(
        None, ge=1, le=10_000,
        description="most trials in flight (also at most B); null: chosen from trials")

    @model_validator(mode="after")
    def _sampler_fits(self) -> SearchSpec:
        if self.sampler == "cmaes":
            for name, dim in self.space.items():
                if not (isinstance(dim, RangeSpec) and dim.type == "float"):
                    raise _invalid(f"space.{name}", "a float range {low, high} "
                                   "(sampler cmaes searches float ranges only)",
                                   "choices" if isinstance(dim, ChoicesSpec) else "type: int")
        return self


class ParametersSpec(_Strict):
    """Exactly one of: a grid (cartesian product), inline values, a file of rows, or a
    search."""

    grid: dict[ParamName, Annotated[list[ParamValue], Field(min_length=1)]] | None = Field(
        None, min_length=1, description="name -> list of values; the cartesian product"
    )
    values: list[Annotated[dict[ParamName, ParamValue], Field(min_length=1)]] | None = Field(
        None, min_length=1, description="a list of parameter sets"
    )
    file: PathText | None = Field(
        None, description="a .csv, .parquet or .jsonl file relative to the spec, one row a param"
    )

    search: SearchSpec | None = Field(
        None, description="a calibration: {space, objective, trials, sampler, seed, parallel}")

    @model_validator(mode="after")
    def _exactly_one(self) -> ParametersSpec:
        given = [k for k in ("grid", "values", "file", "search") if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none of them"
            raise _invalid("", "exactly one of grid, values, file or search", got)
        if self.file is not None and Path(self.file).suffix.lower() not in PARAM_FILE_SUFFIXES:
            raise _invalid("file", "a .csv, .parquet or .jsonl file", repr(self.file))
        return self


class JobSpec(_Strict):
    job_id: Annotated[str, StringConstraints(pattern=ID_PATTERN)] | None = Field(
        None, description="derived from the spec when absent"
    )
    model: CallableRef = Field(description="the model as a callable reference 'module:function'")
    code_paths: list[PathText] = Field(
        default_factory=lambda: ["."], description="directories put on sys.path"
    )
    parameters: ParametersSpec = Field(
        description="a mapping with one of grid, values, file or search")
    replicates: StrictInt = Field(1, ge=1)
    seed: StrictInt = Field(0, ge=0)
    targets: list[TargetSpec] = Field(default_factory=list)
    outputs: Outputs = Field("all", description="the model outputs to store: all, none or names")
    output: Annotated[PathText, StringConstraints(min_length=1)] | None = Field(
        None, description="the job's output directory, relative to the spec file"
    )
    batch: BatchSpec = Field(default_factory=lambda: BatchSpec.model_validate({}))
    # Run policy, not identity: changing these never makes an output another job's.
    on_error: OnError = Field(
        default_factory=lambda: BreakerSpec.model_validate({}),
        description="'continue' (finish the sweep whatever fails) or the circuit breaker "
        "{stop_after_first: 10, max_failed: null}, the default",
    )
    sim_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] | None = Field(
        None, description="a simulation running longer fails as Timeout; null: no limit")

    @model_validator(mode="after")
    def _unique_names(self) -> JobSpec:
        targets = [t.name for t in self.targets]
        dup = _first_duplicate(targets)
        if dup is not None:
            i, j = dup
            raise _invalid(
                f"targets[{j}].name",
                "a unique target name",
                f"{targets[j]!r}, already the name of targets[{i}]",
            )
        search = self.parameters.search
        if search is not None and search.objective not in targets:
            raise _invalid(
                "parameters.search.objective",
                f"the name of one of the targets ({', '.join(map(repr, targets))})"
                if targets else "the name of a target (the spec has no targets)",
                repr(search.objective),
            )
        if isinstance(self.outputs, list):
            dup = _first_duplicate(self.outputs)
            if dup is not None:
                i, j = dup
                raise _invalid(
                    f"outputs[{j}]",
                    "unique output names",
                    f"{self.outputs[j]!r}, already outputs[{i}]",
                )
        return self


def _first_duplicate(items: Sequence[Any]) -> tuple[int, int] | None:
    seen: dict[Any, int] = {}
    for j, item in enumerate(items):
        if item in seen:
            return seen[item], j
        seen[item] = j
    return None


def spec_json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()


# --- pydantic errors -> FieldErrors -----------------------------------------------------------

_MODELS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): JobSpec,
    ("batch",): BatchSpec,
    ("on_error",): BreakerSpec,
    ("parameters",): ParametersSpec,
    ("parameters", "search"): SearchSpec,
    # "*": any key of the mapping (a dimension's parameter name).
    ("parameters", "search", "space", "*", _RANGE): RangeSpec,
    ("parameters", "search", "space", "*", _CHOICES): ChoicesSpec,
    ("targets", "[]"): TargetSpec,
}
_field_errors = ErrorTranslator(_MODELS_AT, _PATTERN_TEXT, _UNION_TAGS).field_errors


# --- YAML -------------------------------------------------------------------------------------


def parse_yaml(
    text: str, source: str = "job spec", limits: YamlLimits | None = None
) -> Any:
    """The YAML document in ``text``; a syntax error, a duplicate key or a document past
    ``limits`` is a SpecError."""
    return validation.parse_yaml(text, source, SpecError, limits)


# --- params -----------------------------------------------------------------------------------


def replicate_seed(job_seed: int, param_id: str, replicate: int) -> int:
    digest = hashlib.sha256(f"{job_seed}:{param_id}:{replicate}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class _Expanded:
    names: list[str]
    types: dict[str, str]
    fits: dict[str, frozenset[str]]
    source: ParamSource


_GROUP_TEXT = {"bool": "true or false", "number": "a number", "str": "a string"}


def _kind(value: Scalar) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _group(value: Scalar) -> str:
    kind = _kind(value)
    return "number" if kind in ("int", "float") else kind


_FLOAT_EXACT = 2**53  # every int of at most this magnitude is exactly a float64


def _unify(column: list[tuple[str, Scalar]], errors: list[FieldError]
           ) -> tuple[str, frozenset[str], list[Scalar]]:
    """One type for a name's values, and the types they could be stored as without loss
    (an int column as float, a float column of whole numbers as int: the type a column
    has in committed parts wins, see commit.py). Ints become floats next to floats,
    unless one is too large to be exact as a float; anything else mixed is an error at
    each value whose type differs from the first one's."""
    kinds = {_kind(v) for _, v in column}
    if kinds <= {"int", "float"}:
        # type() is: bools were kept out above, and this runs once per value.
        inexact = [(f, v) for f, v in column
                   if type(v) is int and not -_FLOAT_EXACT <= v <= _FLOAT_EXACT]
        if kinds == {"int", "float"} and inexact:
            errors += [FieldError(f, f"an integer within +-2**53 next to floats (the column "
                                     f"is float, and {v} is not exact as one)",
                                  _show(v, typed=True))
                       for f, v in inexact[:5]]
            return "float", frozenset({"float"}), [v for _, v in column]
        if kinds == {"int"}:
            return "int", frozenset({"int"} | (set() if inexact else {"float"})), \
                [v for _, v in column]
        floats = [float(v) for _, v in column]
        whole = all(v.is_integer() and -_INT64 <= v < _INT64 for v in floats)
        return "float", frozenset({"float"} | ({"int"} if whole else set())), list(floats)
    if len(kinds) > 1:
        first_field, first = column[0]
        expected = f"{_GROUP_TEXT[_group(first)]} (the type in {first_field})"
        errors += [
            FieldError(f, expected, _show(v, typed=True))
            for f, v in column
            if _group(v) != _group(first)
        ]
    kind = kinds.pop()
    return kind, frozenset({kind}), [v for _, v in column]


def _expand_grid(grid: Mapping[str, list[Scalar]]) -> _Expanded:
    names, columns = list(grid), []
    types: dict[str, str] = {}
    fits: dict[str, frozenset[str]] = {}
    collision = _case_collision(names, "parameters.grid")
    errors: list[FieldError] = [collision] if collision else []
    for name, values in grid.items():
        fields = [f"parameters.grid.{name}[{j}]" for j in range(len(values))]
        types[name], fits[name], column = _unify(list(zip(fields, values, strict=True)),
                                                 errors)
        dup = _first_duplicate(column)
        if dup is not None:
            i, j = dup
            errors.append(
                FieldError(
                    fields[j],
                    "unique values (each makes distinct parameter sets)",
                    f"a duplicate of {fields[i]} ({_show(column[i])})",
                )
            )
        columns.append(column)
    if errors:
        raise SpecError(errors)
    return _Expanded(names, types, fits, GridSource(names, columns))


def _expand_rows(rows: list[tuple[str, Mapping[str, Any]]]) -> _Expanded:
    """Params given one by one (inline values or file rows), labelled for messages."""
    first_label, first = rows[0]
    names = list(first)
    collision = _case_collision(names, first_label.partition("[")[0])
    if collision is not None:
        raise SpecError([collision])
    errors = [
        FieldError(label, f"the names of {first_label} ({', '.join(names)})", ", ".join(row))
        for label, row in rows[1:]
        if set(row) != set(names)
    ]
    errors += [
        FieldError(f"{label}.{n}", problem, _show(v, typed=True))
        for label, row in rows
        for n, v in row.items()
        if (problem := _value_problem(v)) is not None
    ]
    if errors:
        raise SpecError(errors)
    types, fits, columns = {}, {}, []
    for n in names:
        types[n], fits[n], column = _unify([(f"{label}.{n}", row[n]) for label, row in rows],
                                           errors)
        columns.append(column)
    if errors:
        raise SpecError(errors)
    keys = list(zip(*columns, strict=True))
    dup = _first_duplicate(keys)
    if dup is not None:
        i, j = dup
        raise SpecError(
            [FieldError(rows[j][0], "unique parameter sets", f"a duplicate of {rows[i][0]}")]
        )
    params = [Param(param_id_of(values), values)
              for values in (dict(zip(names, k, strict=True)) for k in keys)]
    return _Expanded(names, types, fits, ListSource(params))


_READERS: dict[str, Callable[[pa.BufferReader], pa.Table]] = {
    ".csv": pa_csv.read_csv,
    ".parquet": pa_parquet.read_table,
    ".jsonl": pa_json.read_json,
}


def _read_param_file(
    name: str, base_dir: Path, check: Callable[[int, str, str], None],
    max_bytes: int = RUN_LIMITS.max_file_bytes,
) -> tuple[pa.Table, str]:
    """The file's rows and the SHA-256 of the bytes they were parsed from; ``check``
    is given the row count before the rows are read where the file says it (parquet's
    footer: 200 KB of parquet can decompress to 50 million rows). A file of more than
    ``max_bytes`` is refused before it is read."""
    path = (base_dir / name).resolve()
    field = "parameters.file"
    if not path.is_file():
        raise SpecError([FieldError(field, "an existing file", f"{name!r} (no file {path})")])
    suffix = Path(name).suffix.lower()  # as named: a symlink's target may have another
    try:
        # Read once: the digest and the params come from the same bytes, whatever
        # writes to the file meanwhile. One byte past the limit tells a file that grew
        # since it was measured.
        size = path.stat().st_size
        if size <= max_bytes:
            with path.open("rb") as f:
                data = _read_at_most(f, size, max_bytes + 1)
            if len(data) > max_bytes:  # it grew since: say by how much, if it still is
                size = max(len(data), path.stat().st_size)
        if size > max_bytes:
            raise _too_large(field, "bytes", max_bytes, "limits.max_file_bytes",
                             f"{size:,} bytes in {name!r}")
        if not data:  # pyarrow calls an empty file invalid; it has no rows
            raise SpecError([FieldError(field, "at least one row", f"no rows in {path}")])
        if suffix == ".parquet":
            check(pa_parquet.ParquetFile(pa.BufferReader(data)).metadata.num_rows, field,
                  f" rows in {name!r}")
        elif suffix == ".jsonl":
            deep = paramfile.deep_jsonl_line(data)
            if deep is not None:
                raise SpecError([FieldError(
                    field, "one flat object of bool, number or string values a line",
                    f"{path}: line {deep} nested more than "
                    f"{paramfile.JSONL_MAX_DEPTH} levels deep")])
        table = _READERS[suffix](pa.BufferReader(data))
        table.validate(full=True)  # e.g. a parquet string column that is not UTF-8
    except (pa.ArrowException, OSError) as exc:
        raise SpecError(
            [FieldError(field, f"a readable {suffix} file", f"{path}: {_unreadable(exc)}")]
        ) from None
    if table.num_rows == 0:
        raise SpecError([FieldError(field, "at least one row", f"no rows in {path}")])
    return table, hashlib.sha256(data).hexdigest()


def _read_at_most(f: BinaryIO, size: int, limit: int) -> bytes:
    """At most ``limit`` bytes of ``f``, whose size was ``size``: its size and one byte
    more in one read, then (a file that grew, or one whose size says nothing, as in
    /proc) in 1 MiB reads. Never ``f.read(limit)``: that allocates the whole limit
    before reading a byte."""
    data = f.read(min(size + 1, limit))
    if len(data) <= size:
        return data
    parts, total = [data], len(data)
    while total < limit and (chunk := f.read(min(1 << 20, limit - total))):
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _unreadable(exc: BaseException) -> str:
    """What is wrong with a param file, by position only: a reader's message quotes the
    file's text (a header line may be someone's secret), so it is never shown."""
    if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
        return exc.strerror or type(exc).__name__
    text = str(exc)
    columns = re.search(r"Expected (\d+) columns, got (\d+)", text)
    if columns:
        return f"a row of {columns[2]} columns where the header has {columns[1]}"
    where = [f"row {m[1]}" for m in re.finditer(r"\brow #?(\d+)", text, re.IGNORECASE)][:1]
    where += [f"column {int(m[1]) + 1}" for m in re.finditer(r"column #(\d+)", text)][:1]
    return "not readable as such a file" + (f" (at {', '.join(where)})" if where else "")


def _file_columns(table: pa.Table) -> list[FieldError]:
    """Column problems, by column number: a name is the file's text, never shown."""
    errors = []
    names = table.column_names
    if not names:  # JSONL of empty objects
        errors.append(FieldError("parameters.file", "at least one column",
                                 "rows with no columns"))
    for j, n in enumerate(names):
        if not re.fullmatch(PARAM_NAME_PATTERN, n) or n in _RESERVED_PARAM_NAMES:
            expected = (
                f"columns named like parameters ({_PATTERN_TEXT[PARAM_NAME_PATTERN]}, not id)"
            )
            errors.append(FieldError("parameters.file", expected,
                                     f"column {j + 1} of the header, not such a name"))
    dup = _first_duplicate(names)
    if dup is not None:
        errors.append(FieldError("parameters.file", "distinct column names",
                                 f"columns {dup[0] + 1} and {dup[1] + 1} named alike"))
    for j, t in enumerate(table.schema.types):
        if not (
            pa.types.is_boolean(t)
            or pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
        ):
            errors.append(
                FieldError(
                    "parameters.file",
                    "columns of bool, integer, float or string values",
                    f"column {j + 1} of type {t}",
                )
            )
    return errors


# The first errors of a bad params file are shown, then how many more there were.
MAX_FILE_ERRORS = 20


def _expand_file(
    name: str, base_dir: Path, check: Callable[[int, str, str], None] = lambda *_: None,
    max_bytes: int = RUN_LIMITS.max_file_bytes,
) -> _Expanded:
    table, data_sha256 = _read_param_file(name, base_dir, check, max_bytes)
    check(table.num_rows, "parameters.file", f" rows in {name!r}")
    table = paramfile.normalised(table)
    errors = _file_columns(table)
    if errors:
        raise SpecError(errors)
    collision = _case_collision(table.column_names, "parameters.file")
    if collision is not None:
        raise SpecError([collision])
    checked = paramfile.column_types(table)
    if checked is not None:
        types, fits = checked
        source = paramfile.FileSource(table, paramfile.file_digest(data_sha256, table))
        return _Expanded(list(table.column_names), types, fits, source)
    # Something is wrong with a value or a row repeats. The rows at fault are found in
    # Arrow and only they are read one by one, to name them as values in the spec are
    # named, by row and column number (a column's name is the file's text, never shown):
    # a file of 10^7 rows read row by row would take GBs.
    positional = table.rename_columns([f"_c{j + 1}" for j in range(table.num_columns)])
    bad = paramfile.bad_values(table, MAX_FILE_ERRORS + 1)
    if bad is not None:
        rows, total = bad
        try:
            _expand_rows([(f"parameters.file[row {i}]", row) for i, row
                          in zip(rows, positional.take(rows).to_pylist(), strict=True)])
        except SpecError as exc:
            shown = [_by_position(e) for e in exc.errors[:MAX_FILE_ERRORS]]
            more = total - len(shown)
            if more > 0:
                shown.append(FieldError("parameters.file", "no more errors",
                                        f"{more:,} more, not shown"))
            raise SpecError(shown) from None
    repeat = paramfile.first_repeat(table)
    if repeat is not None:
        i, j = repeat
        raise SpecError([FieldError(f"parameters.file[row {j}]", "unique parameter sets",
                                    f"a duplicate of parameters.file[row {i}]")])
    # The Arrow checks refused what row by row accepts: none is known, but the row by
    # row reading is the reference, so its params are the job's.
    return _expand_rows(
        [(f"parameters.file[row {i}]", row) for i, row in enumerate(table.to_pylist())]
    )


_POSITIONAL = re.compile(r"\[row (\d+)\]\._c(\d+)\b")


def _by_position(error: FieldError) -> FieldError:
    """``parameters.file[row 3]._c2`` as ``parameters.file[row 3, column 2]``."""
    def fix(text: str) -> str:
        return _POSITIONAL.sub(r"[row \1, column \2]", text)
    return FieldError(fix(error.field), fix(error.expected), fix(error.got))


def _expand(spec: JobSpec, base_dir: Path, limits: SpecLimits) -> _Expanded:
    """The spec's params, its size checked against ``limits`` before they are expanded."""
    parameters = spec.parameters

    def check(n: int, field: str, shape: str) -> None:
        _check_size(spec, n, field, shape, limits)

    if spec.replicates > limits.max_replicates:
        raise _too_large("replicates", "replicates", limits.max_replicates,
                         "limits.max_replicates", f"{spec.replicates:,}")
    if parameters.grid is not None:
        sizes = [len(v) for v in parameters.grid.values()]
        check(math.prod(sizes), "parameters.grid", f" (a grid of {' x '.join(map(str, sizes))})")
        return _expand_grid(parameters.grid)
    if parameters.values is not None:
        check(len(parameters.values), "parameters.values", "")
        return _expand_rows(
            [(f"parameters.values[{i}]", row) for i, row in enumerate(parameters.values)]
        )
    if parameters.search is not None:
        check(parameters.search.trials, "parameters.search.trials", " trials")
        return _expand_search(parameters.search)
    assert parameters.file is not None  # ParametersSpec guarantees exactly one form
    return _expand_file(parameters.file, base_dir, check, limits.max_file_bytes)


def _expand_search(search: SearchSpec) -> _Expanded:
    """A search's names and types; its source is made once the output is known."""
    from tidegate import search as searching

    try:
        searching.require(search.sampler)
    except searching.SearchUnavailable as exc:
        raise SpecError([FieldError(exc.field, exc.expected, exc.got)]) from None
    names = list(search.space)
    collision = _case_collision(names, "parameters.search.space")
    errors: list[FieldError] = [collision] if collision else []
    types: dict[str, str] = {}
    fits: dict[str, frozenset[str]] = {}
    for name, dim in search.space.items():
        if isinstance(dim, ChoicesSpec):
            fields = [f"parameters.search.space.{name}.choices[{j}]"
                      for j in range(len(dim.choices))]
            types[name], fits[name], column = _unify(
                list(zip(fields, dim.choices, strict=True)), errors)
            dup = _first_duplicate(column)
            if dup is not None:
                errors.append(FieldError(fields[dup[1]], "unique choices",
                                         f"a duplicate of {fields[dup[0]]}"))
        else:
            types[name] = dim.type
            fits[name] = frozenset({"int", "float"} if dim.type == "int" else {"float"})
    if errors:
        raise SpecError(errors)
    return _Expanded(names, types, fits, ListSource([]))


# --- the job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A validated, path-resolved spec; its params are a source, expanded as they run."""

    spec: JobSpec
    source: str
    base_dir: Path
    job_id: str
    params: ParamSource
    param_names: list[str]
    param_types: dict[str, str]
    # The types each name's values can be stored as without loss (param_types' among
    # them): a column keeps its type in committed parts when the grown spec's fits it.
    param_fits: dict[str, frozenset[str]]
    code_paths: list[Path]
    output_dir: Path
    fingerprint: str

    def seeds(self, param_id: str) -> list[int]:
        return [replicate_seed(self.spec.seed, param_id, r) for r in range(self.spec.replicates)]

    @property
    def n_params(self) -> int:
        return self.params.total

    @property
    def n_tasks(self) -> int:
        return self.n_params * (self.spec.replicates + len(self.spec.targets))

    def identity(self) -> dict[str, Any]:
        return _identity(self.spec, self.param_names)


def _identity(spec: JobSpec, names: list[str]) -> dict[str, Any]:
    """What makes two runs the same job. Not job_id, code_paths, output or batch: B may
    change between runs of one job and its output can move. Not the parameter values
    either: a job whose values grow (or shrink) is the same job, which resumes, runs
    the new params and keeps the others; its parameter names are (as a set: the order
    of a grid's names or a file's columns changes no param's id)."""
    search = spec.parameters.search
    return {
        "model": spec.model,
        "param_names": sorted(names),
        # A search's told losses are the objective's, over its space's dimensions (their
        # kinds and choices: Optuna refuses another distribution for a told name; a
        # range's bounds may change, and its trials budget grow).
        **({"search": {"objective": search.objective,
                       "space": {n: _dimension_identity(d) for n, d in search.space.items()}}}
           if search is not None else {}),
        "replicates": spec.replicates,
        "seed": spec.seed,
        "targets": [{"name": t.name, "function": t.function} for t in spec.targets],
        "outputs": spec.outputs,
    }


def _dimension_identity(dim: RangeSpec | ChoicesSpec) -> dict[str, Any]:
    if isinstance(dim, ChoicesSpec):
        return {"choices": dim.choices}
    return {"type": dim.type, "log": dim.log, "step": dim.step is not None}


def _fingerprint(identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _derived_job_id(model: str, fingerprint: str) -> str:
    stem = model.partition(":")[0].rsplit(".", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("_.-")[:55] or "job"
    return f"{stem}-{fingerprint[:8]}"


def job_from_dict(
    data: Any,
    *,
    base_dir: Path,
    source: str = "job spec",
    output: str | Path | None = None,
    output_root: Path | None = None,
    limits: SpecLimits = RUN_LIMITS,
) -> Job:
    """Validate and expand a spec already parsed; relative paths are taken from base_dir.
    Its size is checked against ``limits`` before it is expanded."""
    if not isinstance(data, dict):
        got = "nothing (an empty document)" if data is None else _show(data, typed=True)
        raise SpecError([FieldError("<top level>", "a mapping of spec fields", got)], source)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_field_errors(exc), source) from None
    base_dir = Path(base_dir).resolve()
    try:
        expanded = _expand(spec, base_dir, limits)
    except SpecError as exc:
        raise SpecError(exc.errors, source) from None
    fingerprint = _fingerprint(_identity(spec, expanded.names))
    job_id = spec.job_id or _derived_job_id(spec.model, fingerprint)
    if output is not None:
        problem = path_problem(str(output))
        if problem is not None:  # `tidegate run --output`
            raise SpecError([FieldError("--output", PATH_TEXT,
                                        f"{_show(str(output))} ({problem})")], source)
        output_dir = Path(output).resolve()
    elif spec.output is not None:
        output_dir = (base_dir / spec.output).resolve()
    else:
        output_dir = (Path(output_root or base_dir / "results") / job_id).resolve()
    params: ParamSource = expanded.source
    if spec.parameters.search is not None:
        from tidegate.search import SearchSource

        params = SearchSource(spec.parameters.search, expanded.names, output_dir,
                              job_id=job_id, job_seed=spec.seed)
    return Job(
        spec=spec,
        source=source,
        base_dir=base_dir,
        job_id=job_id,
        params=params,
        param_names=expanded.names,
        param_types=expanded.types,
        param_fits=expanded.fits,
        code_paths=[(base_dir / p).resolve() for p in spec.code_paths],
        output_dir=output_dir,
        fingerprint=fingerprint,
    )


def load_job(
    path: str | Path,
    *,
    output: str | Path | None = None,
    output_root: Path | None = None,
    limits: SpecLimits = RUN_LIMITS,
) -> Job:
    """Read the YAML spec at ``path``; its relative paths are relative to its directory."""
    path = Path(path)
    return job_from_dict(
        validation.read_yaml_file(path, SpecError, limits.yaml),
        base_dir=path.parent,
        source=str(path),
        output=output,
        output_root=output_root,
        limits=limits,
    )


@dataclass(frozen=True, slots=True)
class _Arity:
    names: tuple[str, ...]  # stand-ins for the positional arguments tidegate passes
    expected: str


# How a worker calls them: model(params, seed), target(returns).
MODEL_ARGS = _Arity(("params", "seed"), "(params, seed): a dict of parameter values and an int")
TARGET_ARGS = _Arity(("returns",), "(returns): the list of a param's SimReturns")


def _call_shape_error(fn: Callable[..., Any], arity: _Arity) -> str | None:
    """Why ``fn`` cannot be called the way tidegate calls it, or None (also when its
    signature cannot be read, as for some builtins: the worker then tells)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*arity.names)
    except TypeError as exc:
        return f" has signature {sig} ({exc})"
    return None


def check_callables(job: Job) -> None:
    """Import the model and every target the way a worker will, so that a typo fails at
    submit time rather than on the cluster."""
    errors = [
        FieldError(f"code_paths[{i}]", "an existing directory", f"{raw!r} (no such path: {path})")
        for i, (raw, path) in enumerate(zip(job.spec.code_paths, job.code_paths, strict=True))
        if not path.exists()
    ]
    refs = [("model", job.spec.model)]
    refs += [(f"targets[{i}].function", t.function) for i, t in enumerate(job.spec.targets)]
    refused: list[FieldError] = []
    # Afresh, under the job's code paths alone: a module an earlier check imported (an
    # earlier version, another job's) is never the one checked.
    with simreturn.fresh_code([str(p) for p in job.code_paths]):
        for (field, ref), arity in zip(refs, [MODEL_ARGS] + [TARGET_ARGS] * len(job.spec.targets),
                                       strict=True):
            try:
                fn = simreturn.import_callable(ref)
                wrong = _call_shape_error(fn, arity)
                if wrong is not None:
                    errors.append(FieldError(field, f"a callable taking {arity.expected}",
                                             f"{ref!r}{wrong}"))
            except simreturn.RefOutsideModule as exc:
                refused.append(FieldError(field, "a callable defined in the module before ':'",
                                          str(exc)))
            except Exception as exc:  # anything the user's module raises on import
                errors.append(
                    FieldError(
                        field,
                        "an importable callable 'module:function'",
                        f"{ref!r} ({type(exc).__name__}: {exc})",
                    )
                )
    if refused:
        raise CallableRefused(refused, job.source)
    if errors:
        raise SpecError(errors, job.source)
