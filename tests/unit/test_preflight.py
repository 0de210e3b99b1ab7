"""Pre-flight: what `validate` and `run` check before any cluster starts (the model's and
targets' signatures, an output tidegate can create and write)."""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import temp_module
from tidegate.spec import (
    MODEL_ARGS,
    TARGET_ARGS,
    SpecError,
    _call_shape_error,
    check_callables,
    job_from_dict,
)
from tidegate.writer import OutputNotWritable, check_writable

MODULE = """
def no_seed(params):
    return {}

def ok(params, seed):
    return {}

def keywords(params, seed, scale=1.0):
    return {}

def everything(*args, **kwargs):
    return {}

def two_args(returns, observed):
    return 0.0

def three(params, seed, scale):
    return {}

def loss(returns):
    return 0.0

class Model:
    def __call__(self, params, seed):
        return {}
"""


@pytest.fixture
def module(tmp_path: Path) -> Iterator[str]:
    with temp_module(tmp_path, MODULE, "tg_preflight") as name:
        yield name


def _fn(module: str, name: str):  # type: ignore[no-untyped-def]
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("name", "bad"), [("no_seed", True), ("ok", False),
                                            ("keywords", False), ("everything", False),
                                            ("three", True)])
def test_a_model_must_take_params_and_seed(module: str, name: str, bad: bool) -> None:
    error = _call_shape_error(_fn(module, name), MODEL_ARGS)
    assert (error is not None) is bad
    if bad:
        assert "signature" in error  # type: ignore[operator]


def test_a_target_must_take_one_argument(module: str) -> None:
    assert _call_shape_error(_fn(module, "two_args"), TARGET_ARGS) is not None
    assert _call_shape_error(_fn(module, "loss"), TARGET_ARGS) is None
    assert _call_shape_error(functools.partial(_fn(module, "two_args"), observed=1),
                             TARGET_ARGS) is None


def test_an_unreadable_signature_is_left_to_the_worker() -> None:
    """min has no signature inspect can read: the check passes it (the worker tells)."""
    with pytest.raises(ValueError):
        import inspect

        inspect.signature(min)
    assert _call_shape_error(min, MODEL_ARGS) is None


def test_check_callables_names_the_field_and_the_signature(module: str, tmp_path: Path) -> None:
    job = job_from_dict({"model": f"{module}:no_seed",
                         "parameters": {"values": [{"a": 1}]},
                         "targets": [{"name": "t", "function": f"{module}:two_args"},
                                     {"name": "u", "function": f"{module}:loss"}]},
                        base_dir=tmp_path)
    with pytest.raises(SpecError) as info:
        check_callables(job)
    fields = {e.field: str(e) for e in info.value.errors}
    assert set(fields) == {"model", "targets[0].function"}
    assert "(params, seed)" in fields["model"] and "(params)" in fields["model"]
    assert "(returns)" in fields["targets[0].function"]


def test_a_callable_instance_is_checked_by_its_call(module: str, tmp_path: Path) -> None:
    job = job_from_dict({"model": f"{module}:Model",
                         "parameters": {"values": [{"a": 1}]}}, base_dir=tmp_path)
    # The class itself is what the reference names: Model(params, seed) fails to bind
    # (its __init__ takes none), which is how a worker would call it too.
    with pytest.raises(SpecError):
        check_callables(job)


# --- an output tidegate can create and write -----------------------------------------


def test_an_output_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for create in (False, True):
        with pytest.raises(OutputNotWritable) as info:
            check_writable(tmp_path / "file" / "out", create=create)
        text = str(info.value)
        assert text.startswith("output: expected a directory tidegate can create and write")
        assert "is not a directory" in text and str(tmp_path / "file") in text


def test_a_writable_output_is_created_and_left_clean(tmp_path: Path) -> None:
    check_writable(tmp_path / "a" / "b", create=False)
    assert not (tmp_path / "a").exists()  # validate creates nothing
    check_writable(tmp_path / "a" / "b", create=True)
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root bypasses file modes, not a read-only mount)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("create", [False, True])
def test_a_read_only_output_is_refused(read_only_dir: Path, create: bool) -> None:
    for target in (read_only_dir, read_only_dir / "job"):
        with pytest.raises(OutputNotWritable) as info:
            check_writable(target, create=create)
        assert str(read_only_dir) in str(info.value)
