"""Issue 10's confinement rules: callable references stay in their module, a job output
is its own (no overlap, no links, one run at a time), tidegate deletes only its own files,
and param-file errors never echo the file."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import temp_module
from tidegate.jobqueue import JobQueue, OutputInUse, outputs_overlap
from tidegate.simreturn import RefOutsideModule, import_callable, outputs_to_ipc, run_sim
from tidegate.spec import CallableRefused, SpecError, check_callables, job_from_dict
from tidegate.writer import (
    LEDGER,
    MANIFEST,
    Around,
    OutputLock,
    OutputLocked,
    UnsafeOutput,
    check_no_links,
    discard_output,
    foreign_entries,
    ledgers_around,
    remove_unrecorded,
    safe_path,
)

MODULE_SOURCE = """
import os
from os.path import join

def simulate(params, seed):
    return {}

def evil(params, seed):
    import pyarrow as pa
    return {"../evil": pa.table({"x": [1]})}

class Model:
    def run(self, params, seed):
        return {}

    @staticmethod
    def simulate(params, seed):
        return {}

    borrowed = staticmethod(os.getcwd)

    def _hidden(self, params, seed):
        return {}

def _helper(params, seed):
    return {}
"""


@pytest.fixture
def module(tmp_path: Path):
    """A uniquely named module in tmp_path; sys.path and sys.modules restored after."""
    with temp_module(tmp_path, MODULE_SOURCE, "tg_paths") as name:
        yield name


# --- callable references -----------------------------------------------------------------


@pytest.mark.parametrize("attr", ["os.system", "os.path.join", "join", "Model.borrowed",
                                  "Model.__init__", "__builtins__", "Model.run.__globals__",
                                  "_helper", "Model._hidden"])
def test_a_reference_may_not_leave_its_module(module: str, attr: str) -> None:
    """Modules, imported functions, builtins, special and private names on the path are
    refused."""
    with pytest.raises(RefOutsideModule) as info:
        import_callable(f"{module}:{attr}")
    assert module in str(info.value)


def test_the_known_bypasses_are_refused() -> None:
    """The two forms of the report: through os, and through pyarrow's builtins."""
    for ref in ("tidegate.workloads:os.system", "tidegate.workloads:pa.lib.__builtins__.exec"):
        with pytest.raises(RefOutsideModule):
            import_callable(ref)


@pytest.mark.parametrize("attr", ["simulate", "Model", "Model.simulate"])
def test_callables_defined_in_the_module_are_imported(module: str, attr: str) -> None:
    """A function, a class and a class's own static method are what a reference may name."""
    assert callable(import_callable(f"{module}:{attr}"))


def test_a_worker_refuses_the_bypass_too() -> None:
    """run_sim with a bypassing model fails the replicate before calling anything."""
    result = run_sim("tidegate.workloads:os.system", {}, "p", 0, 0)
    assert result.error is not None and result.error.type == "RefOutsideModule"


def test_check_callables_raises_callable_refused(tmp_path: Path) -> None:
    """Validation refuses the same references (the daemon turns it into 403)."""
    job = job_from_dict({"model": "tidegate.workloads:os.system",
                         "parameters": {"values": [{"a": 1}]}}, base_dir=tmp_path)
    with pytest.raises(CallableRefused) as info:
        check_callables(job)
    assert info.value.errors[0].field == "model"


# --- output names a model returns ----------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "x" * 300, "", ".hidden", "-x"])
def test_model_output_names_follow_the_spec_rule(name: str) -> None:
    """An output name that is not a plain directory name is refused, the name shown short."""
    with pytest.raises(ValueError) as info:
        outputs_to_ipc({name: pa.table({"x": [1]})})
    assert "output names must be" in str(info.value) and len(str(info.value)) < 250


def test_a_bad_output_name_fails_that_replicate_only(module: str) -> None:
    """run_sim turns the refusal into the replicate's error (that param fails alone)."""
    result = run_sim(f"{module}:evil", {}, "p", 0, 0)
    assert result.error is not None and "output names" in result.error.message


# --- job outputs in the queue --------------------------------------------------------------


def test_outputs_overlap_when_equal_or_nested() -> None:
    """Equal and nested directories overlap; siblings and name prefixes do not."""
    assert outputs_overlap("/r/a", "/r/a") and outputs_overlap("/r/a", "/r/a/params/x")
    assert outputs_overlap("/r/a/b", "/r/a")
    assert not outputs_overlap("/r/a", "/r/ab") and not outputs_overlap("/r/a", "/r/b")


@pytest.mark.parametrize(("other", "how"), [("/r/a", "is the output of"),
                                            ("/r/a/params/sub", "contains the output of"),
                                            ("/r", "is inside the output of")])
def test_queue_refuses_an_output_overlapping_another_job(
    tmp_path: Path, other: str, how: str
) -> None:
    """A job whose output overlaps a finished job's is refused, naming that job."""
    with JobQueue(tmp_path / "jobs.sqlite") as q:
        q.submit("first", {}, other)
        q.start("first")
        q.finish("first", "succeeded")
        with pytest.raises(OutputInUse) as info:
            q.submit("second", {}, "/r/a")
        assert "'first'" in str(info.value) and how in str(info.value)
        assert [r.id for r in q.list()] == ["first"]
        assert q.submit("first", {}, other).state == "queued"  # its own rerun is fine


def test_queue_guard_runs_in_the_insert_transaction(tmp_path: Path) -> None:
    """A guard that raises leaves no job inserted."""
    def guard() -> None:
        raise OutputInUse("/r/a", "x", "contains")

    with JobQueue(tmp_path / "jobs.sqlite") as q:
        with pytest.raises(OutputInUse):
            q.submit("a", {}, "/r/a", guard=guard)
        assert q.list() == []


def test_ledgers_around_finds_outer_and_inner_outputs(tmp_path: Path) -> None:
    """Ledgers above the output (up to the root) and below it count; its own does not."""
    root = tmp_path / "root"
    (root / "outer" / "mine" / "deep" / "inner").mkdir(parents=True)
    for d in ("outer", "outer/mine", "outer/mine/deep/inner"):
        (root / d / LEDGER).write_text("")
    around = ledgers_around(root / "outer" / "mine", root)
    assert around.found == [root / "outer", root / "outer" / "mine" / "deep" / "inner"]
    assert not around.gave_up
    assert ledgers_around(root / "elsewhere", root).found == []


def test_ledgers_around_gives_up_after_the_limit(tmp_path: Path) -> None:
    """The search below an output reads a bounded number of entries and says so."""
    out = tmp_path / "out"
    (out / "many").mkdir(parents=True)
    for i in range(30):
        (out / "many" / f"f{i}").write_text("")
    (out / "params").mkdir()  # the output's own dataset directories are not searched
    for i in range(30):
        (out / "params" / f"part-{i:06d}.parquet").write_text("")
    assert ledgers_around(out, tmp_path, limit=40) == Around([], gave_up=False)
    assert ledgers_around(out, tmp_path, limit=20) == Around([], gave_up=True)


# --- links, foreign files, locks -------------------------------------------------------------


def test_safe_path_refuses_links_and_escapes(tmp_path: Path) -> None:
    """No part is written through a symlinked dataset directory or a '..' name."""
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    (out / "model_outputs").mkdir(parents=True)
    (out / "model_outputs" / "x").symlink_to(outside)
    with pytest.raises(UnsafeOutput, match="symbolic link"):
        safe_path(out, "model_outputs/x/part-000000.parquet")
    with pytest.raises(UnsafeOutput):
        safe_path(out, "model_outputs/../../evil/part-000000.parquet")
    assert safe_path(out, "params/part-000000.parquet").parent.is_dir()
    assert list(outside.iterdir()) == []


def test_resume_cleanup_never_follows_a_link(tmp_path: Path) -> None:
    """A symlinked params/ is reported, and remove_unrecorded leaves its target alone."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-000000.parquet").write_text("someone else's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "params").symlink_to(outside)
    with pytest.raises(UnsafeOutput, match="params"):
        check_no_links(out)
    assert remove_unrecorded(out, set()) == []
    assert discard_output(out) == []
    assert (outside / "part-000000.parquet").exists()


def test_discard_output_removes_only_tidegate_files(tmp_path: Path) -> None:
    """--restart keeps a user's own files in params/ and beside the datasets."""
    out = tmp_path
    (out / "params").mkdir()
    (out / "params" / "part-000000.parquet").write_text("")
    (out / "params" / "notes.txt").write_text("mine")
    (out / "targets" / "t").mkdir(parents=True)
    (out / "targets" / "t" / ".part-000001.parquet.tmp").write_text("")
    (out / "job.yaml").write_text("mine")
    (out / MANIFEST).write_text("{}")
    (out / LEDGER).write_text("")
    removed = discard_output(out)
    assert removed == [LEDGER, MANIFEST, "params/part-000000.parquet",
                       "targets/t/.part-000001.parquet.tmp"]
    assert (out / "params" / "notes.txt").read_text() == "mine"
    assert (out / "job.yaml").exists() and not (out / "targets").exists()


def test_foreign_entries(tmp_path: Path) -> None:
    """A non-empty directory without manifest or ledger is foreign; a tidegate one is not."""
    assert foreign_entries(tmp_path / "absent") == []
    (tmp_path / "job.yaml").write_text("")
    (tmp_path / "params").mkdir()
    assert foreign_entries(tmp_path) == ["job.yaml", "params"]
    (tmp_path / LEDGER).write_text("")
    assert foreign_entries(tmp_path) == []


def test_output_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    """A second lock on one output is refused naming pid and host, until the first goes."""
    first = OutputLock(tmp_path)
    with pytest.raises(OutputLocked) as info:
        OutputLock(tmp_path)
    assert f"pid {os.getpid()} on {os.uname().nodename}" in str(info.value)
    first.release()
    OutputLock(tmp_path).release()


# --- param files ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content"), [
    ("secrets.csv", "DB_PASSWORD=hunter2\na,b\n"),
    ("secrets.csv", "DB_PASSWORD=hunter2\n1\n"),
    ("secrets.jsonl", '{"DB_PASSWORD": "hunter2"}\n{"DB_PASSWORD": hunter2}\n'),
    ("secrets.parquet", "DB_PASSWORD=hunter2"),
])
def test_param_file_errors_never_echo_its_contents(
    tmp_path: Path, name: str, content: str
) -> None:
    """The error names the file and a position, never the text in it."""
    (tmp_path / name).write_text(content)
    with pytest.raises(SpecError) as info:
        job_from_dict({"model": "m:f", "parameters": {"file": name}}, base_dir=tmp_path)
    text = str(info.value)
    assert "hunter2" not in text and "DB_PASSWORD" not in text
    assert info.value.errors[0].field.startswith("parameters.file")


def test_daemon_refuses_an_output_too_large_to_search(tmp_path: Path) -> None:
    """The daemon's overlap guard shares the bounded search and says that it gave up."""
    from tidegate.service import _check_output_dir

    root = tmp_path / "root"
    (root / "job" / "many").mkdir(parents=True)
    (root / "job" / LEDGER).write_text("")  # its own ledger: not foreign, not nested
    for i in range(10_001):
        (root / "job" / "many" / f"f{i}").touch()
    with pytest.raises(OutputInUse, match="more than 10000 entries"):
        _check_output_dir(root / "job", root)
