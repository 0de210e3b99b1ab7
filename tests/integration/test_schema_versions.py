"""Outputs of the release before schema versions resume; a garbage ledger stops `run`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import read_dataset, synthetic_spec, tidegate, write_spec
from tidegate.store import Ledger

OUTPUT_V1 = Path(__file__).parent.parent / "fixtures" / "output_v1"


def _summary(proc) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_output_of_the_unversioned_release_resumes(tmp_path: Path) -> None:
    """The fixture (2 of 3 params committed by the old release) reruns to 3 params, each
    once: its ledger is migrated to version 2, the 2 are skipped, their parts untouched,
    the third lands in a new part with its file sizes and checksums recorded."""
    root = shutil.copytree(OUTPUT_V1, tmp_path / "output_v1")
    out = root / "out"
    old_parts = {p.relative_to(out): p.read_bytes() for p in out.rglob("part-*.parquet")}
    proc = tidegate("run", root / "job.yaml", "--workers", "1", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = _summary(proc)
    assert summary["state"] == "succeeded"
    assert summary["params"] == {"total": 3, "ok": 3, "failed": 0, "resumed": 2,
                                 "quarantined": 0, "orphaned": 0}
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == len(set(ids)) == 3
    with Ledger(out / "_ledger.sqlite") as ledger:
        assert ledger.schema_version == 6
        assert ledger.committed_param_ids() == set(ids)
        assert ledger.next_part() == 3
        assert [bool(p.sizes) for p in ledger.parts()] == [False, False, True]
        # Parts of the old release record no code hash; the new one its run's.
        hashes = ledger.part_code_hashes()
        code = ledger.code()
        assert code is not None and [hashes[0], hashes[1], hashes[2]] == [None, None, code[0]]
    assert {rel: (out / rel).read_bytes() for rel in old_parts} == old_parts
    assert len(read_dataset(out / "model_outputs" / "data")) > 0
    assert sorted(r["param_id"] for r in read_dataset(out / "targets" / "score")) == sorted(ids)


def test_run_with_a_garbage_ledger_exits_2_naming_it(tmp_path: Path) -> None:
    """`tidegate run` whose output holds a ledger that is not SQLite stops with exit 2,
    leaving it alone; --restart, which the message suggests, discards it and runs."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(3))
    ledger = tmp_path / "out" / "_ledger.sqlite"
    ledger.parent.mkdir()
    ledger.write_text("not a ledger\n" * 100)
    proc = tidegate("run", spec, "--workers", "1", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert f"tidegate: error: {ledger}: not a SQLite database" in proc.stderr
    assert "expected a tidegate ledger" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--restart" in proc.stderr
    assert ledger.read_text() == "not a ledger\n" * 100
    again = tidegate("run", spec, "--restart", "--workers", "1", "--json", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert _summary(again)["params"]["ok"] == 3
