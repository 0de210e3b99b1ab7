"""The controller knobs: one model, one number policy, the same value from every source."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, reject
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.conftest import SIR_DIR
from tidegate.cli import main
from tidegate.config import ConfigError, load_config
from tidegate.controller import ControllerConfig
from tidegate.knobs import (
    DEPRECATED_ENV,
    BatchSpec,
    ControllerKnobs,
    KnobError,
    controller_config,
    knob_from_flag,
    knobs_from_env,
    run_overrides,
)
from tidegate.runner import RunOptions
from tidegate.spec import Job, SpecError, job_from_dict

KNOBS = ["memory_fraction", "high_water", "low_water", "saturation", "cooldown_s"]
BOUNDS = ["min", "max"]


def job(tmp_path: Path, **batch: Any) -> Job:
    data = {"model": "m:f", "parameters": {"values": [{"a": 1}]}, "batch": batch}
    return job_from_dict(data, base_dir=tmp_path)


def spec_error(tmp_path: Path, **batch: Any) -> Any:
    with pytest.raises(SpecError) as info:
        job(tmp_path, **batch)
    return info.value.errors[0]


def env_error(env: dict[str, str]) -> Any:
    with pytest.raises(KnobError) as info:
        knobs_from_env(env)
    assert info.value.source == "environment"
    return info.value.errors[0]


# --- ranges and the number policy ----------------------------------------------------------

OUT_OF_RANGE = [
    ("memory_fraction", 0, "a number > 0"),
    ("memory_fraction", 1.5, "a number <= 1"),
    ("high_water", 0, "a number > 0"),
    ("high_water", 1.01, "a number <= 1"),
    ("low_water", 0, "a number > 0"),
    ("low_water", 1, "a number < 1"),
    ("saturation", 0.5, "a number >= 1"),
    ("saturation", 101, "a number <= 100"),
    ("cooldown_s", -1, "a number >= 0"),
    ("cooldown_s", 86401, "a number <= 86400"),
    ("min", 0, "an integer >= 1"),
    ("max", 0, "an integer >= 1"),
]


@pytest.mark.parametrize(("knob", "value", "expected"), OUT_OF_RANGE)
def test_range_error_names_field_expected_got(
    tmp_path: Path, knob: str, value: Any, expected: str
) -> None:
    """Out of range in the spec, the config or a variable: the error names where, the range
    and the value."""
    error = spec_error(tmp_path, **{knob: value})
    assert (error.field, error.expected, error.got) == (f"batch.{knob}", expected, str(value))
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {f"controller.{knob}": value})
    config = info.value.errors[0]
    assert (config.field, config.expected) == (f"controller.{knob}", expected)
    variable = f"TIDEGATE_CONTROLLER__{knob.upper()}"
    env = env_error({variable: str(value)})
    assert (env.field, env.expected, env.got) == (variable, expected, repr(str(value)))


@pytest.mark.parametrize("knob", KNOBS + BOUNDS + ["size"])
def test_bool_is_not_a_number(tmp_path: Path, knob: str) -> None:
    """true is refused for every knob in the spec and the config, not read as 1."""
    error = spec_error(tmp_path, **{knob: True})
    assert error.field == f"batch.{knob}"
    assert error.expected.startswith(("a number", "an integer")) and error.got == "true (bool)"
    if knob != "size":
        with pytest.raises(ConfigError) as info:
            load_config(None, {}, {f"controller.{knob}": True})
        assert info.value.errors[0].got == "true (bool)"


def test_ints_are_floats_but_floats_are_not_ints(tmp_path: Path) -> None:
    """An integer is a fine fraction or factor; 2.5 params in flight is an error."""
    batch = job(tmp_path, memory_fraction=1, saturation=3, cooldown_s=0).spec.batch
    assert (batch.memory_fraction, batch.saturation, batch.cooldown_s) == (1.0, 3.0, 0.0)
    assert isinstance(batch.saturation, float)
    error = spec_error(tmp_path, max=2.5)
    assert (error.field, error.got) == ("batch.max", "2.5 (float)")
    assert error.expected.startswith("an integer")


def test_nan_and_inf_are_refused(tmp_path: Path) -> None:
    """inf and nan are not numbers a knob can take, from a spec or a variable."""
    assert spec_error(tmp_path, saturation=float("inf")).expected.startswith("a finite number")
    error = env_error({"TIDEGATE_CONTROLLER__COOLDOWN_S": "nan"})
    assert error.expected.startswith("a finite number") and error.got == "nan"


def test_text_is_read_as_the_number_it_spells() -> None:
    """Every variable is text: " 0.4 " is 0.4 and "3" is 3; "lots" names the variable."""
    knobs = knobs_from_env({"TIDEGATE_CONTROLLER__MEMORY_FRACTION": " 0.4 ",
                            "TIDEGATE_CONTROLLER__MAX": "3"})
    assert knobs.overrides() == {"memory_fraction": 0.4, "max_size": 3}
    error = env_error({"TIDEGATE_CONTROLLER__SATURATION": "lots"})
    assert (error.field, error.got) == ("TIDEGATE_CONTROLLER__SATURATION", "'lots'")
    assert error.expected.startswith("a number")


def test_pairs_are_checked_within_a_layer(tmp_path: Path) -> None:
    """low_water below high_water and min <= max, named by section; the spec and `run`
    leave a missing partner to the other layers, the daemon checks it against the default."""
    error = spec_error(tmp_path, low_water=0.7, high_water=0.6)
    assert (error.field, error.expected) == ("batch.low_water",
                                             "a fraction below batch.high_water (0.6)")
    assert job(tmp_path, low_water=0.8).spec.batch.low_water == 0.8
    assert knobs_from_env({"TIDEGATE_CONTROLLER__LOW_WATER": "0.8"}).low_water == 0.8
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {"controller.min": 20000})
    assert info.value.errors[0].expected == "an integer <= controller.max (10000, the default)"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"TIDEGATE_CONTROLLER__HIGH_WATER": "0.5"})
    error = info.value.errors[0]
    assert (error.field, error.got) == ("TIDEGATE_CONTROLLER__HIGH_WATER", "0.5")
    assert error.expected == "a fraction above controller.low_water (0.55, the default)"


# --- the same value from every source --------------------------------------------------------


def test_every_source_gives_the_same_config(tmp_path: Path) -> None:
    """memory_fraction 0.4 from the spec, the daemon config, a variable or the flag makes
    the same ControllerConfig."""
    plain = job(tmp_path)
    from_spec = controller_config(job(tmp_path, memory_fraction=0.4), RunOptions())
    daemon = load_config(None, {"TIDEGATE_CONTROLLER__MEMORY_FRACTION": "0.4"})
    from_config = controller_config(plain, RunOptions(defaults=daemon.controller.overrides()))
    env = {"TIDEGATE_CONTROLLER__MEMORY_FRACTION": "0.4"}
    from_env = controller_config(plain, RunOptions(controller=run_overrides(env, {})))
    flag = knob_from_flag("memory_fraction", "--memory-fraction", "0.4")
    from_flag = controller_config(
        plain, RunOptions(controller=run_overrides({}, {"memory_fraction": flag}))
    )
    assert from_spec == from_config == from_env == from_flag
    assert from_spec == ControllerConfig(memory_fraction=0.4)


def test_layers_in_order(tmp_path: Path) -> None:
    """Defaults, then the spec, then the overrides (the flag over the variable)."""
    spec = job(tmp_path, memory_fraction=0.3, high_water=0.7, saturation=4)
    env = {"TIDEGATE_CONTROLLER__MEMORY_FRACTION": "0.35", "TIDEGATE_CONTROLLER__HIGH_WATER": "0.8"}
    overrides = run_overrides(env, {"memory_fraction": 0.45})
    config = controller_config(spec, RunOptions(controller=overrides))
    assert (config.memory_fraction, config.high_water, config.saturation) == (0.45, 0.8, 4.0)
    assert config.low_water == ControllerConfig().low_water


def test_a_spec_overrides_the_daemons_knobs(tmp_path: Path) -> None:
    """The daemon's controller knobs are defaults: what a job's batch section sets wins,
    what it leaves out (min and max included) comes from the daemon."""
    daemon = load_config(None, {"TIDEGATE_CONTROLLER__MEMORY_FRACTION": "0.4",
                                "TIDEGATE_CONTROLLER__SATURATION": "3",
                                "TIDEGATE_CONTROLLER__MAX": "50"})
    options = RunOptions(defaults=daemon.controller.overrides())
    config = controller_config(job(tmp_path, memory_fraction=0.3), options)
    assert (config.memory_fraction, config.saturation, config.max_size) == (0.3, 3.0, 50)
    assert controller_config(job(tmp_path, max=80), options).max_size == 80


def test_size_pins_b_and_a_pin_widens_the_range(tmp_path: Path) -> None:
    """batch.size pins B; a pin from the command line outside [min, max] widens it."""
    pinned = controller_config(job(tmp_path, size=7, min=5, max=10), RunOptions())
    assert (pinned.pinned, pinned.min_size, pinned.max_size) == (7, 5, 10)
    spec = job(tmp_path, min=5, max=10)
    above = controller_config(spec, RunOptions(batch_size=20))
    assert (above.pinned, above.min_size, above.max_size) == (20, 5, 20)
    below = controller_config(spec, RunOptions(batch_size=2))
    assert (below.pinned, below.min_size, below.max_size) == (2, 2, 10)
    assert controller_config(spec, RunOptions()).pinned is None


def test_spec_batch_keeps_its_fields() -> None:
    """The spec's batch section lists size, min and max first, then the controller's knobs,
    then fuse (how tasks are cut, not a controller knob)."""
    assert list(BatchSpec.model_fields) == ["size", "min", "max", *KNOBS, "fuse"]
    assert BatchSpec().fuse is True
    assert set(ControllerKnobs.model_fields) == set(BOUNDS + KNOBS)
    assert (BatchSpec().min, BatchSpec().max) == (1, 10000)


@st.composite
def valid_knobs(draw: st.DrawFn) -> dict[str, Any]:
    """Knobs the model accepts, drawn from its documented ranges, any subset set."""
    high = draw(st.floats(0.01, 1.0))
    low = draw(st.floats(0.001, 1.0, exclude_max=True).filter(lambda v: v < high))
    low_b = draw(st.integers(1, 100))
    values = {
        "memory_fraction": draw(st.floats(0.0, 1.0, exclude_min=True)),
        "high_water": high,
        "low_water": low,
        "saturation": draw(st.floats(1.0, 100.0)),
        "cooldown_s": draw(st.floats(0.0, 86400.0)),
        "min": low_b,
        "max": draw(st.integers(low_b, 20000)),
    }
    keep = draw(st.sets(st.sampled_from(sorted(values))))
    return {k: v for k, v in values.items() if k in keep}


@given(valid_knobs())
def test_whatever_the_model_accepts_the_policy_accepts(knobs: dict[str, Any]) -> None:
    """Knobs the daemon config accepts always make a valid ControllerConfig: the model's
    ranges lie inside the policy's, so a daemon cannot start and then fail every job."""
    try:
        overrides = ControllerKnobs.model_validate(knobs).overrides()
    except ValidationError:
        reject()  # a pair out of order (high_water below the default low_water)
    config = ControllerConfig(**overrides)
    assert all(getattr(config, name) == value for name, value in overrides.items())


# --- the environment of `tidegate run` -------------------------------------------------------


def test_deprecated_spelling_still_works_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    """TIDEGATE_MEMORY_FRACTION still sets the knob for `run`, logging action=deprecated_env
    that names the new spelling."""
    with caplog.at_level(logging.WARNING, logger="tidegate.knobs"):
        knobs = knobs_from_env({"TIDEGATE_MEMORY_FRACTION": "0.4", "TIDEGATE_COOLDOWN_S": "5"})
    assert knobs.overrides() == {"memory_fraction": 0.4, "cooldown_s": 5.0}
    warned = [r for r in caplog.records if getattr(r, "action", None) == "deprecated_env"]
    assert len(warned) == 2
    assert "TIDEGATE_CONTROLLER__MEMORY_FRACTION" in warned[0].getMessage()


def test_new_spelling_wins_and_old_errors_name_the_old_variable() -> None:
    """With both spellings set the new one counts; a bad old value names the old variable."""
    env = {"TIDEGATE_HIGH_WATER": "0.6", "TIDEGATE_CONTROLLER__HIGH_WATER": "0.9"}
    assert knobs_from_env(env).high_water == 0.9
    error = env_error({"TIDEGATE_LOW_WATER": "high"})
    assert (error.field, error.got) == ("TIDEGATE_LOW_WATER", "'high'")


def test_every_old_variable_maps_to_a_knob() -> None:
    """Each deprecated variable is TIDEGATE_ + a knob of the model, in upper case."""
    for name, knob in DEPRECATED_ENV.items():
        assert knob in ControllerKnobs.model_fields
        assert name == f"TIDEGATE_{knob.upper()}"


def sir_spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load((SIR_DIR / "job.yaml").read_text())
    spec["code_paths"] = [str(SIR_DIR)]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("variable", ["TIDEGATE_CONTROLLER__LOW_WATER", "TIDEGATE_LOW_WATER"])
def test_run_rejects_a_bad_variable_before_any_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    """`tidegate run` reads both spellings; a bad value exits 2 naming the variable."""
    monkeypatch.setenv(variable, "1.5")
    assert main(["run", str(sir_spec(tmp_path)), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{variable}: expected a number < 1, got '1.5'" in err
    assert not (tmp_path / "out").exists()


def test_run_flag_is_read_by_the_knob_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--memory-fraction 1.5 is refused by argparse with the knob's range, naming the flag."""
    assert main(["run", str(sir_spec(tmp_path)), "--memory-fraction", "1.5"]) == 2
    assert "--memory-fraction: expected a number <= 1, got '1.5'" in capsys.readouterr().err
    with pytest.raises(KnobError):
        knob_from_flag("memory_fraction", "--memory-fraction", "true")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_batch_fuse_takes_true_or_false(value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        BatchSpec.model_validate({"fuse": value})
    assert "fuse" in str(err.value)
    assert BatchSpec.model_validate({"fuse": False}).fuse is False
