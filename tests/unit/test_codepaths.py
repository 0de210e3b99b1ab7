"""The hash of a job's code paths and the daemon's snapshot of them, on real files:
stable, independent of the order files were made in, bounded, links out refused."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tidegate import simreturn
from tidegate.codepaths import (
    CodePathError,
    hash_code,
    remove_snapshots,
    snapshot_code,
    snapshot_dirs,
)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


FILES = {"model.py": "def simulate(p, s):\n    return {}\n", "pkg/__init__.py": "",
         "pkg/util.py": "X = 1\n", "data/table.csv": "a,b\n1,2\n"}


def test_the_hash_is_stable_and_independent_of_creation_order(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", FILES)
    b = _tree(tmp_path / "b", dict(reversed(list(FILES.items()))))
    os.utime(b / "model.py", (1, 1))  # timestamps are not content
    first, again, other = hash_code([a]), hash_code([a]), hash_code([b])
    assert first.hash == again.hash == other.hash
    assert sorted(first.files) == sorted(f"0/{k}" for k in FILES)
    assert first.nbytes == sum(len(v) for v in FILES.values())


def test_a_change_in_bytes_or_names_changes_the_hash_and_is_named(tmp_path: Path) -> None:
    root = _tree(tmp_path / "code", FILES)
    before = hash_code([root])
    (root / "pkg/util.py").write_text("X = 2\n")
    (root / "new.py").write_text("")
    (root / "data/table.csv").unlink()
    after = hash_code([root])
    assert after.hash != before.hash
    assert after.changes(before.files) == ["-0/data/table.csv", "+0/new.py", "~0/pkg/util.py"]
    # A rename with the same bytes is another tree.
    (root / "new.py").rename(root / "renamed.py")
    assert hash_code([root]).hash != after.hash


def test_generated_and_hidden_files_and_outputs_are_left_out(tmp_path: Path) -> None:
    root = _tree(tmp_path / "code", FILES)
    before = hash_code([root], exclude=[root / "results" / "job", root / "job.yaml"])
    _tree(root, {"__pycache__/model.cpython-311.pyc": "x", "pkg/stale.pyc": "x",
                 ".git/HEAD": "ref", "results/job/part.parquet": "rows",
                 "other/_ledger.sqlite": "", "other/params/p.parquet": "rows",
                 "job.yaml": "model: model:simulate\n",
                 "other.yml": "job_id: other\nmodel: m:f\nparameters:\n  values: []\n",
                 "other.json": '{"model": "m:f",\n "parameters": {"values": []}}'})
    after = hash_code([root], exclude=[root / "results" / "job", root / "job.yaml"])
    assert after.hash == before.hash
    # A YAML file that is no job spec is the model's data: it counts.
    (root / "config.yaml").write_text("rate: 0.5\n")
    assert "0/config.yaml" in hash_code([root]).files


def test_the_index_of_a_code_path_counts(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", {"m.py": "A"})
    b = _tree(tmp_path / "b", {"m.py": "B"})
    assert hash_code([a, b]).hash != hash_code([b, a]).hash


def test_bounds_on_files_and_bytes_name_the_code_path(tmp_path: Path) -> None:
    root = _tree(tmp_path / "code", {f"m{i}.py": "x" * 10 for i in range(5)})
    first = _tree(tmp_path / "first", {"a.py": "", "b.py": ""})
    # The bounds hold for the code paths together: the second one crosses it.
    with pytest.raises(CodePathError, match=r"code_paths\[1\]: expected code_paths of at "
                       r"most 4 files .* more than 4 files"):
        hash_code([first, root], max_files=4)
    with pytest.raises(CodePathError, match=r"code_paths\[0\]: .* more than 45 bytes"):
        hash_code([root], max_bytes=45)
    assert hash_code([root], max_files=5, max_bytes=50).nbytes == 50


def test_links_out_of_the_tree_and_to_directories_are_refused(tmp_path: Path) -> None:
    outside = _tree(tmp_path / "secret", {"key.txt": "k"})
    root = _tree(tmp_path / "code", {"model.py": ""})
    (root / "inside.py").symlink_to(root / "model.py")
    assert "0/inside.py" in hash_code([root]).files  # a link inside counts as its bytes
    (root / "key.txt").symlink_to(outside / "key.txt")
    with pytest.raises(CodePathError, match=r"code_paths\[0\]: expected files and links "
                       r"inside the code path, got key.txt, a link to .*secret/key.txt"):
        hash_code([root])
    (root / "key.txt").unlink()
    (root / "loop").symlink_to(root)
    with pytest.raises(CodePathError, match="a link to the directory"):
        hash_code([root])


def test_a_missing_code_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(CodePathError, match=r"code_paths\[0\]: expected an existing "
                       r"directory, got .*nowhere \(no such path\)"):
        hash_code([tmp_path / "nowhere"])


def test_a_snapshot_is_the_hashed_tree_and_is_removed_when_unused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "code", FILES)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    store = tmp_path / "state" / "code"
    digest = snapshot_code([root], store)
    (copy,) = snapshot_dirs(store, digest.hash, 1)
    assert hash_code([copy]).hash == digest.hash == hash_code([root]).hash
    assert os.access(copy / "run.sh", os.X_OK)
    # The same code again: the snapshot is kept as it is; no temporary copy is left.
    assert snapshot_code([root], store).hash == digest.hash
    assert [p.name for p in store.iterdir()] == [digest.hash]
    (root / "model.py").write_text("changed")
    second = snapshot_code([root], store)
    assert second.hash != digest.hash
    (store / ".tmp-half").mkdir()  # a copy under way: left alone but at start-up
    assert remove_snapshots(store, {second.hash}) == [digest.hash]
    assert sorted(p.name for p in store.iterdir()) == [".tmp-half", second.hash]
    assert remove_snapshots(store, {second.hash}, temporary=True) == [".tmp-half"]


def test_a_failed_import_is_not_cached_and_a_new_key_imports_afresh(tmp_path: Path) -> None:
    name = f"tg_fresh_{time.monotonic_ns()}"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{name}.py").write_text("def simulate(params, seed:\n")  # a syntax error
    try:
        simreturn.use_code([str(code)], "one")
        with pytest.raises(SyntaxError):
            simreturn.import_callable(f"{name}:simulate")
        assert name not in sys.modules
        (code / f"{name}.py").write_text("def simulate(params, seed):\n    return 1\n")
        assert simreturn.import_callable(f"{name}:simulate")({}, 0) == 1
        (code / f"{name}.py").write_text("def simulate(params, seed):\n    return 22\n")
        # The same key keeps its module; another key evicts it and imports the new file.
        assert simreturn.import_callable(f"{name}:simulate")({}, 0) == 1
        simreturn.use_code([str(code)], "two")
        assert name not in sys.modules
        assert simreturn.import_callable(f"{name}:simulate")({}, 0) == 22
        # tidegate's own modules are never evicted, whatever a code path covers.
        simreturn.use_code([str(Path(simreturn.__file__).parents[1])], "three")
        assert "tidegate.simreturn" in sys.modules
    finally:
        simreturn.use_code([], "none")
    assert str(code) not in sys.path


def test_a_code_path_already_on_sys_path_stays_there_when_the_job_changes(tmp_path: Path) -> None:
    """use_code takes off sys.path only what it put there: tidegate's own directory (an
    editable install's .pth entry) left sys.path once a job named it, and the Dask workers
    spawned after (they copy the parent's sys.path) could not import tidegate."""
    own = str(Path(simreturn.__file__).parents[1])
    other = str(tmp_path)
    saved = list(sys.path)
    if own not in sys.path:
        sys.path.append(own)
    try:
        simreturn.use_code([own, other], "first")
        assert sys.path.count(own) == 1 and other in sys.path
        simreturn.use_code([other], "second")
        assert own in sys.path and other in sys.path
        simreturn.use_code([], "none")
        assert own in sys.path
        assert other not in sys.path
    finally:
        simreturn.use_code([], "none")
        sys.path[:] = saved
