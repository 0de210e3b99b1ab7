"""Exit codes: the numbers every command has always used, shown in --help and the docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tidegate.cli import build_parser
from tidegate.exitcodes import COMMANDS, ClientExit, RunExit, ServeExit, epilog, markdown_table

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- exit-codes[^>]*-->\n(.*?)\n<!-- /exit-codes -->", re.DOTALL)


def test_the_numbers_are_the_ones_each_command_has_always_used() -> None:
    """run: 3 cluster, 130 interrupted; serve: 2 config, 3 start-up; client: 3 daemon."""
    assert {c.name: int(c) for c in RunExit} == {
        "OK": 0, "FAILED": 1, "USAGE": 2, "CLUSTER": 3, "FAILURES": 4, "INTERRUPTED": 130}
    assert {c.name: int(c) for c in ServeExit} == {
        "OK": 0, "FORCED": 1, "CONFIG": 2, "STARTUP": 3}
    assert {c.name: int(c) for c in ClientExit} == {
        "OK": 0, "FAILED": 1, "USAGE": 2, "DAEMON": 3, "FAILURES": 4, "INTERRUPTED": 130}
    assert all(c.meaning for enum in (RunExit, ServeExit, ClientExit) for c in enum)


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_docs_table_matches_the_enums(doc: str) -> None:
    """The exit-code table in the docs is the one rendered from the enums
    (regenerate it with `python -m tidegate.exitcodes`)."""
    found = BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))
    assert found == [markdown_table()]


def test_every_command_lists_its_exit_codes_in_its_help() -> None:
    """Each subcommand has an entry in COMMANDS, and its --help ends with that table."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    commands = sub.choices  # type: ignore[attr-defined]
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        text = command.format_help()
        assert text.rstrip().endswith(epilog(name)), name
        for code in COMMANDS[name]:
            assert re.search(rf"^\s+{int(code)}  ", text, re.MULTILINE), (name, code)


def test_the_run_table_names_each_code_once() -> None:
    """epilog('run') has a line per code, in order, with its meaning."""
    lines = epilog("run").splitlines()
    assert lines[0] == "exit codes:"
    assert [int(line.split()[0]) for line in lines[1:]] == [0, 1, 2, 3, 4, 130]
    assert "cluster could not be reached" in lines[4]
