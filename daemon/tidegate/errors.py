"""The one base of every exception tidegate raises on purpose.

Each subclass lives beside the code that raises it (``SpecError`` in spec.py,
``ClusterError`` in cluster.py, ...) and says in its docstring what went wrong, so
``except TidegateError`` catches tidegate's own failures and nothing else.
"""

from __future__ import annotations


class TidegateError(Exception):
    """Something tidegate checked for went wrong; the message says what."""
