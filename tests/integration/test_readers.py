"""The output is plain Parquet: pyarrow.dataset, polars and DuckDB read it with no
tidegate code, exactly as the README shows."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest

from tests.conftest import tidegate


@pytest.fixture(scope="module")
def sir_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("readers") / "sir-demo"
    proc = tidegate("run", Path(__file__).parents[2] / "examples" / "sir" / "job.yaml",
                    "--output", out, "--json", "--no-progress", "--flush-params", "30")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parts"] >= 2
    return out


def test_pyarrow_dataset_reads_every_part(sir_output: Path) -> None:
    """pyarrow.dataset takes a dataset directory as one table across its parts."""
    params = ds.dataset(sir_output / "params").to_table()
    assert params.num_rows == 100
    assert len(set(params.column("param_id").to_pylist())) == 100


def test_polars_reads_targets(sir_output: Path) -> None:
    """polars reads a target's parts with a glob."""
    loss = pl.read_parquet(str(sir_output / "targets" / "incidence" / "*.parquet"))
    assert loss.height == 100
    assert loss["loss"].null_count() == 0


def test_duckdb_joins_params_and_targets(sir_output: Path) -> None:
    """DuckDB joins params to a target by param_id, as in the README."""
    rows = duckdb.sql(f"""
        SELECT p.param_beta, p.param_gamma, t.loss
        FROM '{sir_output}/params/*.parquet' p
        JOIN '{sir_output}/targets/incidence/*.parquet' t USING (param_id)
        ORDER BY t.loss LIMIT 5
    """).fetchall()
    assert len(rows) == 5
    losses = [r[2] for r in rows]
    assert losses == sorted(losses)
    # The observed data were made at beta=0.3, gamma=0.1: the best fits lie near it.
    best_beta, best_gamma, _ = rows[0]
    assert abs(best_beta - 0.3) <= 0.1 and abs(best_gamma - 0.1) <= 0.04
