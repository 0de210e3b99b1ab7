"""The best params of a job output: the lowest losses of one target, with their
parameter values (``tidegate best OUTPUT_DIR``), for a search or a grid alike.

Read in bounded memory: the target's ``param_id`` and ``loss`` columns whole, the ids
of the params that failed, and then the parameter columns of the top rows alone (a
filtered scan); model outputs are never read. A search's trial numbers come from its
journal, read a line at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from tidegate.errors import TidegateError
from tidegate.params import Scalar
from tidegate.search import trial_numbers
from tidegate.writer import LEDGER, MANIFEST, SEARCH_JOURNAL, read_manifest


class NotRanked(TidegateError):
    """The output cannot be ranked: the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class Ranked:
    rank: int
    loss: float
    param_id: str
    values: dict[str, Scalar]
    trial: int | None = None  # a search's trial number, when its journal names it

    def as_dict(self, search: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "loss": self.loss, "param_id": self.param_id}
        if search:
            out["trial"] = self.trial
        out["values"] = self.values
        return out


@dataclass(frozen=True, slots=True)
class Ranking:
    output: Path
    target: str
    search: dict[str, Any] | None  # the spec's parameters.search, for a search
    names: list[str]  # the parameter names, as the params dataset's columns hold them
    scored: int  # params with a finite loss of the target, not failed
    rows: list[Ranked]

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict(self.search is not None) for r in self.rows]

    def text(self) -> str:
        what = "trials" if self.search is not None else "params"
        head = (f"{self.output}: {len(self.rows)} best of {self.scored} {what} with a loss "
                f"of target {self.target!r}, lowest first")
        columns = ["rank", "loss", "param_id"] + (["trial"] if self.search else []) + self.names
        cells = [[str(r.rank), f"{r.loss:.6g}", r.param_id]
                 + ([_cell(r.trial)] if self.search else [])
                 + [_cell(r.values.get(n)) for n in self.names] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        # Numbers right-aligned, the id left-aligned: columns a reader scans down.
        left = {"param_id"}
        lines = ["  ".join(c.ljust(w) if c in left else c.rjust(w)
                           for c, w in zip(columns, widths, strict=True)).rstrip()]
        for row in cells:
            lines.append("  ".join(v.ljust(w) if c in left else v.rjust(w)
                                   for c, v, w in zip(columns, row, widths, strict=True)).rstrip())
        return "\n".join([head, *lines])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def rank(root: Path, top: int, target: str | None = None) -> Ranking:
    """The ``top`` params of the output ``root`` with the lowest loss of ``target``
    (default: a search's objective, else the spec's first target), ascending, ties by
    param id. Failed params and losses that are null, NaN or infinite are left out."""
    if not root.is_dir():
        raise NotRanked(f"OUTPUT_DIR: expected a job output directory, got {str(root)!r} "
                        "(not a directory)")
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as exc:
        raise NotRanked(f"OUTPUT_DIR: cannot read {root / MANIFEST}: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    if manifest is None and not (root / LEDGER).exists():
        raise NotRanked(f"OUTPUT_DIR: {root} holds no {MANIFEST} or {LEDGER}: not a "
                        "tidegate output")
    spec = (manifest or {}).get("spec") or {}
    search = (spec.get("parameters") or {}).get("search")
    search = search if isinstance(search, dict) else None
    known = [t["name"] for t in spec.get("targets") or []
             if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if not spec and (root / "targets").is_dir():  # no manifest yet: the datasets there
        known = sorted(p.name for p in (root / "targets").iterdir()
                       if p.is_dir() and not p.name.startswith("."))
    if not known:
        raise NotRanked(f"OUTPUT_DIR: the job in {root} has no targets, so no loss to rank "
                        "its params by")
    if target is None:
        objective = search.get("objective") if search is not None else None
        target = objective if isinstance(objective, str) and objective in known else known[0]
    elif target not in known:
        raise NotRanked(f"--target: expected one of the job's targets "
                        f"({', '.join(map(repr, known))}), got {target!r}")
    losses = _losses(root, target)
    failed = _failed_ids(root) if losses.num_rows else pa.array([], pa.string())
    if len(failed):
        losses = losses.filter(pc.invert(pc.is_in(losses["param_id"], value_set=failed)))
    if not losses.num_rows:
        raise NotRanked(f"OUTPUT_DIR: no committed param of {root} has a loss of target "
                        f"{target!r} yet (targets/{target} is empty)")
    order = pc.sort_indices(losses, sort_keys=[("loss", "ascending"),
                                               ("param_id", "ascending")])
    chosen = losses.take(order[:top]).to_pylist()
    ids = [r["param_id"] for r in chosen]
    names, values = _values(root, ids)
    numbers: dict[str, int] = {}
    journal = root / SEARCH_JOURNAL
    if search is not None and journal.is_file() and not journal.is_symlink():
        try:
            numbers = trial_numbers(journal, set(ids))
        except OSError:  # the numbers are a convenience: the ranking stands without
            numbers = {}
    rows = [Ranked(i + 1, float(r["loss"]), r["param_id"], values.get(r["param_id"], {}),
                   numbers.get(r["param_id"])) for i, r in enumerate(chosen)]
    return Ranking(root, target, search, names, losses.num_rows, rows)


def _dataset(path: Path) -> ds.Dataset:
    try:
        return ds.dataset(path, format="parquet")
    except (pa.ArrowException, OSError) as exc:
        raise NotRanked(f"OUTPUT_DIR: cannot read {path}: {exc}") from None


def _read(dataset: ds.Dataset, path: Path, columns: list[str],
          where: pc.Expression | None = None) -> pa.Table:
    try:
        return dataset.to_table(columns=columns, filter=where)
    except (pa.ArrowException, OSError) as exc:
        raise NotRanked(f"OUTPUT_DIR: cannot read {path}: {exc}") from None


def _losses(root: Path, target: str) -> pa.Table:
    """param_id and loss of every committed param with a finite loss of ``target`` (a
    search tells a trial of a loss that is not finite as failed)."""
    path = root / "targets" / target
    empty = pa.table({"param_id": pa.array([], pa.string()),
                      "loss": pa.array([], pa.float64())})
    if not path.is_dir():
        return empty
    dataset = _dataset(path)
    if not dataset.files:  # the directory made, no part committed into it yet
        return empty
    missing = {"param_id", "loss"} - set(dataset.schema.names)
    if missing:
        raise NotRanked(f"OUTPUT_DIR: {path} is not a target dataset: it lacks "
                        f"{', '.join(sorted(missing))}")
    table = _read(dataset, path, ["param_id", "loss"])
    loss = table["loss"]
    if not pa.types.is_floating(loss.type):
        loss = pc.cast(loss, pa.float64())
        table = table.set_column(1, "loss", loss)
    return table.filter(pc.fill_null(pc.is_finite(loss), False))


def _failed_ids(root: Path) -> pa.Array:
    path = root / "params"
    if not path.is_dir():
        return pa.array([], pa.string())
    dataset = _dataset(path)
    if "status" not in dataset.schema.names:
        return pa.array([], pa.string())
    table = _read(dataset, path, ["param_id"], pc.field("status") != "ok")
    return table["param_id"].combine_chunks()


def _values(root: Path, ids: list[str]) -> tuple[list[str], dict[str, dict[str, Scalar]]]:
    """The parameter names, and the values of the params ``ids``."""
    path = root / "params"
    if not path.is_dir():
        raise NotRanked(f"OUTPUT_DIR: {root} has losses in targets/ but no params/ dataset "
                        "with their values")
    dataset = _dataset(path)
    names = [c for c in dataset.schema.names if c.startswith("param_") and c != "param_id"]
    table = _read(dataset, path, ["param_id", *names], pc.field("param_id").isin(ids))
    values: dict[str, dict[str, Scalar]] = {}
    for row in table.to_pylist():
        values[row["param_id"]] = {c.removeprefix("param_"): row[c] for c in names}
    return [c.removeprefix("param_") for c in names], values


def dumps(ranking: Ranking) -> str:
    return json.dumps(ranking.as_list(), default=str)
