"""The controller's knobs, declared once.

``ControllerKnobs`` is what a user may set: the daemon config's ``controller:`` section,
the job spec's ``batch:`` section (``BatchSpec`` adds the pin, ``size``), ``tidegate
run``'s flags and the ``TIDEGATE_CONTROLLER__<KNOB>`` variables that both ``run`` and
``serve`` read. ``controller_config`` merges those layers into the policy's own
``ControllerConfig``, whose dataclass defaults are tidegate's defaults.

One number policy for every source: true and false are not numbers, an integer is a fine
float but a float is no integer, text is read as the number it spells (every variable is
text), inf and nan are refused, and an error names the field (or the variable or flag),
what was allowed and what came.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from tidegate.controller import BOUNDS, ControllerConfig
from tidegate.validation import ErrorTranslator, FieldError, ValidationFailed, invalid

if TYPE_CHECKING:
    from tidegate.spec import Job

log = logging.getLogger(__name__)

DEFAULTS = ControllerConfig()
ENV_PREFIX = "TIDEGATE_CONTROLLER__"  # the config key controller.<knob> as a variable
# `tidegate run`'s spelling until 0.2, read for one more release with a warning.
DEPRECATED_ENV = {
    f"TIDEGATE_{knob.upper()}": knob
    for knob in ("memory_fraction", "high_water", "low_water", "saturation", "cooldown_s")
}
# Variables that pin B for `tidegate run` only (ModelOps' name for its users).
PIN_ENV = ("TIDEGATE_BATCH_SIZE", "MODELOPS_JOB_BATCH_SIZE")
# User-facing names that differ from ControllerConfig's.
_CONFIG_NAMES = {"size": "pinned", "min": "min_size", "max": "max_size"}


class KnobError(ValidationFailed):
    """A controller knob is not valid."""

    default_source = "controller knobs"


def _number_from_text(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    def before(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse(value.strip())
            except ValueError:
                pass  # the strict type below reports it as what it is
        return value

    return before


# The number types of every input tidegate reads (the daemon config uses them too).
Int = Annotated[StrictInt, BeforeValidator(_number_from_text(int))]
Float = Annotated[StrictFloat, AllowInfNan(False), BeforeValidator(_number_from_text(float))]
_JSON_BOUNDS = {
    "ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"
}


def standard_bounds(schema: dict[str, Any], model: Any = None) -> None:
    """A model's ``json_schema_extra``: pydantic writes the bounds of ``Int | None`` and
    ``Float | None`` (a validator before a nullable type) as "ge", "le", ..., which no JSON
    Schema validator reads; the keywords are "minimum", "maximum", ... Declaring the
    validator outside the null would fix the schema but make errors show a variable's
    value as the parsed number rather than the text the user wrote."""
    for prop in schema.get("properties", {}).values():
        for branch in (prop, *prop.get("anyOf", ())):
            for raw, keyword in _JSON_BOUNDS.items():
                if raw in branch:
                    branch[keyword] = branch.pop(raw)


def _range(name: str, **caps: Any) -> dict[str, Any]:
    """The policy's bounds of ``name`` as pydantic's, tightened by ``caps``: the range a
    user may set, inside what the policy accepts (a saturation of 1e9 is a typo)."""
    b = BOUNDS[_CONFIG_NAMES.get(name, name)]
    out = {("gt" if b.lo_open else "ge"): b.lo, ("lt" if b.hi_open else "le"): b.hi}
    return {k: v for k, v in out.items() if v is not None} | caps


def _knob(name: str, text: str, **caps: Any) -> Any:
    """A knob nobody has to set: None leaves it to the next layer or the default."""
    default = getattr(DEFAULTS, _CONFIG_NAMES.get(name, name))
    return Field(None, description=f"{text} ({default:g})", **_range(name, **caps))


def _b_value(text: str, default: int | None = None) -> Any:
    """A value of B (size, min or max): an integer >= min_size's bound; how the three
    relate is checked by the validators."""
    return Field(default, description=text, **_range("min"))


class ControllerKnobs(BaseModel):
    """The controller's knobs one source sets; null keeps the next source's value or
    tidegate's default (docs/controller.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=standard_bounds)
    # How messages name this section's keys ("controller.high_water").
    section: ClassVar[str] = "controller"
    # Check a knob against the default of its partner when the partner is not set here:
    # the daemon's own knobs must make a valid config before its first job starts.
    checks_defaults: ClassVar[bool] = True

    min: Int | None = _b_value("the smallest B the controller may choose")
    max: Int | None = _b_value("the largest B the controller may choose")
    memory_fraction: Float | None = _knob(
        "memory_fraction", "share of each worker's memory limit results may use"
    )
    high_water: Float | None = _knob("high_water", "worker memory fraction that stops admission")
    # Below high_water too (checked below); high_water <= 1 makes 1 its bound in the schema.
    low_water: Float | None = _knob(
        "low_water", "worker memory fraction below which B may grow", lt=1
    )
    saturation: Float | None = _knob(
        "saturation", "queue depth factor of the useful ceiling", le=100
    )
    cooldown_s: Float | None = _knob(
        "cooldown_s", "seconds without growth after an OOM event", le=86400
    )

    @model_validator(mode="after")
    def _ordered(self) -> ControllerKnobs:
        lo, hi = self._pair("min", "max")
        if lo is not None and hi is not None and lo[0] > hi[0]:
            if self.max is not None:
                raise invalid("max", f"an integer >= {lo[1]}", str(self.max))
            raise invalid("min", f"an integer <= {hi[1]}", str(self.min))
        low, high = self._pair("low_water", "high_water")
        if low is not None and high is not None and low[0] >= high[0]:
            if self.low_water is not None:
                raise invalid("low_water", f"a fraction below {high[1]}", str(self.low_water))
            raise invalid("high_water", f"a fraction above {low[1]}", str(self.high_water))
        return self

    def _pair(self, *names: str) -> list[tuple[Any, str] | None]:
        """Each knob's value and how a message names it; None if unset and not checked."""
        out: list[tuple[Any, str] | None] = []
        for name in names:
            value, key = getattr(self, name), f"{self.section}.{name}"
            if value is not None:
                out.append((value, f"{key} ({value})"))
            elif self.checks_defaults:
                default = getattr(DEFAULTS, _CONFIG_NAMES.get(name, name))
                out.append((default, f"{key} ({default}, the default)"))
            else:
                out.append(None)
        return out

    def overrides(self) -> dict[str, Any]:
        """The knobs set, named as ``ControllerConfig`` fields."""
        return {_CONFIG_NAMES.get(k, k): v for k, v in self.model_dump().items() if v is not None}


class _Pin(BaseModel):
    size: Int | None = _b_value("pin B; null lets the controller choose")


# _Pin is the last base so that `size` comes first, as the spec has always listed it.
class BatchSpec(ControllerKnobs, _Pin):
    """How many params may be in flight: pinned, or chosen by the controller in [min, max]."""

    section = "batch"
    # Layers above the spec (the daemon's knobs, `run`'s variables and flags) may set the
    # partner; the merged config is checked when the job starts.
    checks_defaults = False

    min: Int = _b_value("the smallest B the controller may choose", DEFAULTS.min_size)
    max: Int = _b_value("the largest B the controller may choose", DEFAULTS.max_size)
    # Not a controller knob: how tasks are cut, not how many params are in flight.
    fuse: StrictBool = Field(
        True, description="run several short replicates of a param in one Dask task "
        "(docs/controller.md, task granularity); false: one task per sim")

    @model_validator(mode="after")
    def _pin_in_range(self) -> BatchSpec:
        if self.size is not None and not self.min <= self.size <= self.max:
            raise invalid(
                "size",
                f"null or an integer in [min, max] = [{self.min}, {self.max}]",
                str(self.size),
            )
        return self


class _Overrides(ControllerKnobs):
    """`tidegate run`'s variables and flags: above the spec, so a partner may come from it."""

    checks_defaults = False


# --- the environment and flags of `tidegate run` ---------------------------------------------

_TRANSLATE = ErrorTranslator({(): _Overrides}, typed=False)


def env_name(knob: str) -> str:
    return ENV_PREFIX + knob.upper()


def _validate(data: Mapping[str, Any], names: Mapping[str, str], source: str) -> _Overrides:
    """Validated knobs; an error names what the user set (``names``: knob -> variable)."""
    try:
        return _Overrides.model_validate(data)
    except ValidationError as exc:
        errors = []
        for error in _TRANSLATE.field_errors(exc):
            knob, _, rest = error.field.partition(".")
            errors.append(FieldError(names.get(knob, knob) + rest, error.expected, error.got))
        raise KnobError(errors, source) from None


def knobs_from_env(env: Mapping[str, str]) -> ControllerKnobs:
    """The knobs in ``TIDEGATE_CONTROLLER__<KNOB>`` variables; the old spelling
    ``TIDEGATE_<KNOB>`` still counts, with a warning, where the new one is not set."""
    data: dict[str, str] = {}
    names: dict[str, str] = {}
    for old, knob in DEPRECATED_ENV.items():
        if old in env:
            log.warning(
                "%s is deprecated and will stop working in the next release; set %s instead",
                old, env_name(knob), extra={"action": "deprecated_env"},
            )
            data[knob], names[knob] = env[old], old
    for knob in ControllerKnobs.model_fields:
        if env_name(knob) in env:
            data[knob], names[knob] = env[env_name(knob)], env_name(knob)
    return _validate(data, names, "environment")


def knob_from_flag(knob: str, flag: str, text: str) -> Any:
    """The value of ``flag`` read by the knob's rules; a bad one is a KnobError naming it."""
    return getattr(_validate({knob: text}, {knob: flag}, "command line"), knob)


def run_overrides(env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """`tidegate run`'s knobs as ``ControllerConfig`` fields: the environment, then the
    flags given (knob -> value, None for a flag not given)."""
    values = knobs_from_env(env).overrides()
    values.update({_CONFIG_NAMES.get(k, k): v for k, v in flags.items() if v is not None})
    return values


# --- what a run takes besides its spec --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """A part is written every ``params`` params, ``nbytes`` buffered bytes or
    ``seconds`` seconds, whichever comes first."""

    params: int = 1000
    seconds: float = 10.0
    nbytes: int = 128 * 2**20

    def __post_init__(self) -> None:
        if self.params < 1:
            raise ValueError(f"flush_params must be >= 1, got {self.params}")
        if not self.seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {self.seconds}")
        if self.nbytes < 1:
            raise ValueError(f"flush_bytes must be >= 1, got {self.nbytes}")


@dataclass(frozen=True, slots=True)
class RunOptions:
    batch_size: int | None = None  # pins B; None: the spec's batch.size, else adaptive
    # ControllerConfig fields: ``defaults`` under the spec's batch section (the daemon's
    # knobs), ``controller`` over it (`run`'s variables and flags).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    controller: Mapping[str, Any] = field(default_factory=dict)
    flush_params: int = 1000
    flush_seconds: float = 10.0
    flush_bytes: int = 128 * 2**20
    restart: bool = False
    # Un-commit the params the ledger records as failed (or quarantined) and run them
    # again, in one part rewrite per part holding them (commit.rewrite_part).
    retry_failed: bool = False
    # At the end of a run that walked the whole spec, drop the committed params it no
    # longer has (the orphans) from every dataset (commit.prune_orphans).
    prune: bool = False
    # Resume although the job's code paths changed since its committed params (the
    # parts record each one's code hash); refused otherwise (commit.CodeChanged).
    accept_code_change: bool = False
    # Cluster memory snapshot and controller decision interval: the scheduler learns
    # workers' RSS from heartbeats every 0.5 s (up to 10 workers), no fresher than this.
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.restart and self.retry_failed:
            raise ValueError("restart and retry_failed cannot be combined: a restart "
                             "recomputes every param anyway")
        if self.restart and self.prune:
            raise ValueError("restart and prune cannot be combined: a restart discards "
                             "every committed param, the orphaned ones included")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        self.flush  # noqa: B018 (builds the FlushPolicy, which checks the flush knobs)

    @property
    def flush(self) -> FlushPolicy:
        return FlushPolicy(self.flush_params, self.flush_seconds, self.flush_bytes)



# --- the layers merged -----------------------------------------------------------------------


def controller_config(job: Job, options: RunOptions) -> ControllerConfig:
    """The controller's config, each layer over the one before: tidegate's defaults, the
    daemon's ``controller:`` knobs (``options.defaults``), the knobs the job's spec sets
    in ``batch:``, `run`'s variables and flags (``options.controller``), then a pin from
    the command line. An operator's knobs are defaults; a job's spec is about that job."""
    b = job.spec.batch
    values = dict(options.defaults)
    values.update({_CONFIG_NAMES.get(k, k): getattr(b, k)
                   for k in b.model_fields_set if getattr(b, k) is not None and k != "fuse"})
    values.update(options.controller)
    if options.batch_size is not None:
        values["pinned"] = options.batch_size
    if values.get("pinned") is not None:
        # A pin outside [min, max] widens the range rather than failing.
        values["min_size"] = min(values.get("min_size", DEFAULTS.min_size), values["pinned"])
        values["max_size"] = max(values.get("max_size", DEFAULTS.max_size), values["pinned"])
    return ControllerConfig(**values)
