"""Logging set-up for the command line and the daemon: text or JSON lines on stderr,
every record carrying a stable ``action`` name (``batch_resized``, ``worker_lost``,
...) that tests and log queries match on."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.file_proxy import FileProxy

_console: Console | None = None


def stderr_console() -> Console:
    """The rich console on stderr that log lines go through on a terminal: a progress
    bar drawn on it (tidegate.progress) keeps them above itself."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


class _ActionDefault(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "action"):
            record.action = "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, action, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "action": getattr(record, "action", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler: logging.StreamHandler[Any]
    if fmt != "json" and sys.stderr.isatty():
        # On a terminal each line is printed by rich: wrapped to the terminal's width,
        # and above the progress bar while one shows instead of pasted onto it. Python
        # warnings (distributed's "Port 8787 is already in use") go the same way.
        handler = logging.StreamHandler(FileProxy(stderr_console(), sys.stderr))
        logging.captureWarnings(True)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ActionDefault())
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s action=%(action)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def quiet_dask_logs() -> None:
    """Dask's INFO lines (worker start/stop, plugin registration) drown ours. Called
    after distributed is imported, since importing it configures its loggers."""
    level = max(logging.WARNING, logging.getLogger().level)
    for name in ("distributed", "dask"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers.clear()
        logger.propagate = True
