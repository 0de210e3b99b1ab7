"""Every exception tidegate defines derives from TidegateError and documents itself."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tidegate
from tidegate.errors import TidegateError


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.iter_modules(tidegate.__path__):
        if info.name == "__main__":
            continue  # running it is `python -m tidegate`
        module = importlib.import_module(f"tidegate.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException):
                found.append(cls)
    return found


def test_every_exception_class_is_a_tidegate_error_with_a_docstring() -> None:
    """Each exception class in the package subclasses TidegateError and has its own
    docstring (the default reading of what went wrong)."""
    classes = _exception_classes()
    names = {c.__name__ for c in classes}
    assert {"SpecError", "ConfigError", "ClusterError", "SchedulerLost", "LedgerMismatch",
            "JobExists", "UnknownJob", "ApiError", "DaemonUnreachable", "StartupError",
            "Forbidden", "UsageError", "ValidationFailed"} <= names
    for cls in classes:
        assert issubclass(cls, TidegateError), cls
        assert "__doc__" in vars(cls) and cls.__doc__, cls


def test_unknown_job_is_still_a_key_error() -> None:
    """UnknownJob keeps KeyError as a base, so callers catching KeyError still do."""
    from tidegate.jobqueue import UnknownJob

    assert issubclass(UnknownJob, KeyError)
    assert str(UnknownJob("x")) == "no job 'x'"
