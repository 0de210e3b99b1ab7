"""The one base of every exception tidegate raises on purpose.

Each subclass lives beside the code that raises it (``SpecError`` in spec.py,
``ClusterError`` in cluster.py, ...) and says in its docstring what went wrong, so
``except TidegateError`` catches tidegate's own failures and nothing else.
"""

from __future__ import annotations


class TidegateError(Exception):
    """Something tidegate checked for went wrong; the message says what."""


def error_json(message: str, exit_code: int) -> str:
    """What a command given ``--json`` prints on stdout when it fails before it has an
    answer to print (the message also goes to stderr), so that a script reading stdout
    gets an object either way."""
    import json

    return json.dumps({"error": message, "exit_code": int(exit_code)})
