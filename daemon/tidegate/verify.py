"""Checking a job output against its ledger, and repairing it.

Resume runs the cheap check (:func:`check_parts` with ``full=False``): every committed
file exists with its recorded size, each params part's footer reads and counts the rows
the part was committed with, and the ledger holds that many params rows for it.
``tidegate verify`` adds the full check: sha256 of every file, every file read whole, the
params part's ids against the ledger's, and the model output and target rows belonging
to the part's params. Damage is never counted as done: resume refuses
(:class:`OutputDamaged`) and ``tidegate verify --repair`` un-commits the damaged parts
(their params rerun) or rebuilds a lost ledger from the parts' param ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from tidegate.errors import TidegateError
from tidegate.store import Ledger, RecordedFile
from tidegate.writer import (
    DATASET_DIRS,
    LEDGER,
    MANIFEST,
    PART_RE,
    OutputError,
    linked_dataset_dirs,
    linked_part_files,
    read_manifest,
    remove_files,
    sha256_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Damage:
    part: int | None  # None: a dataset directory
    file: str
    problem: str

    def __str__(self) -> str:
        where = "" if self.part is None else f"part {self.part}: "
        return f"{where}{self.file}: {self.problem}"


class OutputDamaged(TidegateError):
    """Committed parts are missing or damaged (or the ledger is lost); resume refuses."""

    def __init__(self, root: Path, problems: Iterable[object], what: str = ""):
        self.root = root
        self.problems = [str(p) for p in problems]
        shown = "; ".join(self.problems[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(
            f"{root}: {what or 'committed parts are damaged'}: {shown}{more}; run "
            f"`tidegate verify {root} --repair` (it un-commits damaged parts so that a "
            f"rerun recomputes their params, or rebuilds a lost ledger), or rerun with "
            f"--restart to discard the output"
        )


def part_files_on_disk(root: Path) -> list[str]:
    """Every ``part-*.parquet`` under the dataset directories, relative to ``root``."""
    found: list[str] = []
    for top in DATASET_DIRS:
        base = root / top
        if base.is_dir() and not base.is_symlink():
            found += [p.relative_to(root).as_posix() for p in base.rglob("part-*.parquet")
                      if p.is_file() and not _linked(root, p.relative_to(root).as_posix())
                      and PART_RE.match(p.name)]
    return sorted(found)


def _linked(root: Path, rel: str) -> Path | None:
    """The first path from ``root`` down to ``root / rel`` that is a symbolic link."""
    path = root
    for bit in PurePosixPath(rel).parts:
        path = path / bit
        if path.is_symlink():
            return path
    return None


LINK_PROBLEM = ("a symbolic link; tidegate neither reads nor deletes parts through links "
                "(replace it with the file it points to, or remove it)")


def link_damage(root: Path, damage: list[Damage]) -> list[Damage]:
    """The symbolic links among the dataset directories and part files that ``damage``
    (of the committed parts) does not already name: the next run refuses each."""
    named = {d.file for d in damage}
    out = [Damage(None, d.relative_to(root).as_posix(), "a symbolic link; the next run "
                  "refuses it (replace it with a directory)")
           for d in linked_dataset_dirs(root)]
    for f in linked_part_files(root):
        rel = f.relative_to(root).as_posix()
        if rel not in named:
            m = PART_RE.match(f.name)
            out.append(Damage(int(m.group(1)) if m else None, rel,
                              f"not in the ledger, and {LINK_PROBLEM}"))
    return out


def roll_intents(root: Path, ledger: Ledger) -> list[str]:
    """Finish what a run that died mid-commit left: an intent whose files are all in
    place with their recorded sizes is committed (forward; an intent replacing a part
    swaps it in and removes the replaced part's files); any other is undone, its files
    removed (back; a part it was to replace stays as it was). Returns one line per
    intent."""
    done: list[str] = []
    for intent in ledger.intents():
        in_place = all(
            (root / f).is_file() and (root / f).stat().st_size == r.bytes
            for f, r in intent.files.items()
        )
        if in_place:
            # A rewritten part (--retry-failed) replaces a committed one: the swap is one
            # transaction, and the replaced part's files go once it is done.
            replaced = next((cp.files for cp in ledger.parts() if cp.part == intent.replaces),
                            [])
            ledger.commit_intent(intent)
            remove_files(root, replaced)
            done.append(f"part {intent.part}: rolled forward (committed)"
                        + (f", replacing part {intent.replaces}"
                           if intent.replaces is not None else ""))
        else:
            for f, r in intent.files.items():
                (root / f).unlink(missing_ok=True)
                if r.tmp:
                    (root / r.tmp).unlink(missing_ok=True)
            ledger.drop_intent(intent.part)
            done.append(f"part {intent.part}: rolled back (files removed)")
    return done


def check_parts(root: Path, ledger: Ledger, *, full: bool) -> list[Damage]:
    """What is wrong with the committed parts: cheap checks, or (``full``) everything.

    The cheap check costs a stat a file, a footer a part and one pass of the ledger's
    part index, never a read of every committed id: with 900,000 params committed in 900
    parts, reading each params file's ids and comparing them with the ledger's rows took
    2.7 s of a 3.2 s resume. A part of ledger version 1 (no recorded sizes) still has its
    ids compared: its total size is all the ledger knows of it."""
    damage: list[Damage] = []
    rows = ledger.params_per_part()
    for cp in ledger.parts():
        sizes_known = bool(cp.sizes)
        if full or not sizes_known:
            ids: list[str] | None = ledger.part_param_ids(cp.part)
        else:
            ids = None
            if (n := rows.get(cp.part, 0)) != cp.n_params:
                damage.append(Damage(cp.part, "(ledger)", f"{n} params rows name this part, "
                                     f"which was committed with {cp.n_params}"))
        total = 0
        for rel in cp.files:
            problem, size = _check_file(root, rel, cp.sizes.get(rel), ids, cp.n_params,
                                        full=full)
            total += size
            if problem:
                damage.append(Damage(cp.part, rel, problem))
        part_damaged = any(d.part == cp.part for d in damage)
        if not sizes_known and not part_damaged and total != cp.nbytes:
            damage.append(Damage(cp.part, "(all files)",
                                 f"{total} bytes on disk, the ledger recorded {cp.nbytes}"))
    for part, n in ledger.dangling_params().items():
        # Counted as done, with no part to hold their data: resume would skip them and
        # clean the part's files away as unknown.
        damage.append(Damage(part, "(ledger)", f"{n} params rows name this part, which the "
                             "ledger's parts table does not record"))
    return damage


def _check_file(root: Path, rel: str, recorded: RecordedFile | None, ids: list[str] | None,
                n_params: int, *, full: bool) -> tuple[str, int]:
    """One committed file's problem ("" if none) and size. ``ids``: the part's ledger
    rows, to compare with the file's; None for the cheap check of a file whose size is
    recorded (its size, and a params file's row count, are compared instead)."""
    path = root / rel
    if (link := _linked(root, rel)) is not None:
        # Accepted, a copy elsewhere would be counted as this output's data, and a
        # restart would delete the rest before refusing the link.
        return (LINK_PROBLEM if link == path else f"{link.relative_to(root)} is "
                + LINK_PROBLEM), 0
    if not path.is_file():
        return "missing", 0
    size = path.stat().st_size
    if recorded is not None and size != recorded.bytes:
        return f"{size} bytes, the ledger recorded {recorded.bytes}", size
    if full and recorded is not None and sha256_of(path) != recorded.sha256:
        return "sha256 differs from the ledger's (the contents changed)", size
    is_params = rel.startswith("params/")
    if ids is None and not is_params:
        return "", size
    try:
        meta = pq.read_metadata(path)
        if ids is None:
            if meta.num_rows != n_params:
                return (f"{meta.num_rows} rows, the part was committed with {n_params} "
                        "params"), size
            return "", size
        if full:
            table = pq.read_table(path)
        elif is_params:
            table = pq.read_table(path, columns=["param_id"])
        else:
            return "", size
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"unreadable Parquet ({str(exc).splitlines()[0][:200]})", size
    if "param_id" not in table.column_names:
        return "no param_id column", size
    got = table.column("param_id").to_pylist()
    if is_params:
        return _ids_problem(got, ids), size
    stray = set(got) - set(ids)
    if stray:
        return f"{len(stray)} param ids not in this part's ledger rows", size
    return "", size


def _ids_problem(got: list[str], ids: list[str]) -> str:
    if len(got) == len(set(got)) and set(got) == set(ids):
        return ""
    missing, extra = set(ids) - set(got), set(got) - set(ids)
    dups = len(got) - len(set(got))
    bits = [f"{len(missing)} of the ledger's missing from the file" if missing else "",
            f"{len(extra)} not in the ledger" if extra else "",
            f"{dups} duplicated" if dups else ""]
    return "param ids differ from the ledger's: " + ", ".join(b for b in bits if b)


def first_schemas(root: Path, ledger: Ledger) -> dict[str, pa.Schema]:
    """Each model output's schema, read from the footer of its first committed part."""
    schemas: dict[str, pa.Schema] = {}
    for cp in ledger.parts():
        for rel in cp.files:
            bits = rel.split("/")
            if len(bits) == 3 and bits[0] == "model_outputs" and bits[1] not in schemas:
                schemas[bits[1]] = pq.read_schema(root / rel).remove_metadata()
    return schemas


# --- repair ------------------------------------------------------------------------------


@dataclass(slots=True)
class Repaired:
    lines: list[str] = field(default_factory=list)
    params_uncommitted: int = 0


def uncommit_damaged(root: Path, ledger: Ledger, damage: list[Damage]) -> Repaired:
    """Forget the damaged parts and remove their files, so that a rerun recomputes their
    params."""
    out = Repaired()
    bad = sorted({d.part for d in damage if d.part is not None})
    files = {cp.part: cp.files for cp in ledger.parts()}
    out.params_uncommitted = ledger.uncommit(bad)
    for part in bad:
        if part not in files:  # dangling params rows: the next run removes its files
            out.lines.append(f"part {part}: its params un-committed (the part was not "
                             "recorded)")
            continue
        for rel in files[part]:
            (root / rel).unlink(missing_ok=True)
        out.lines.append(f"part {part}: un-committed, its files removed")
    return out


def rebuild_ledger(root: Path) -> Repaired:
    """A new ledger from the parts on disk: each part number whose files all read whole
    and whose param ids are new is committed with the statuses its params part holds;
    any other is removed. Needs the manifest (the job id and fingerprint)."""
    manifest = _manifest_naming_the_job(root)
    out = Repaired()
    by_part: dict[int, list[str]] = {}
    for rel in part_files_on_disk(root):
        m = PART_RE.match(rel.rsplit("/", 1)[-1])
        assert m is not None
        by_part.setdefault(int(m.group(1)), []).append(rel)
    seen: set[str] = set()
    with Ledger(root / LEDGER) as ledger:
        ledger.bind(str(manifest["job_id"]), str(manifest["fingerprint"]), {})
        for part, files in sorted(by_part.items()):
            problem, statuses = _rebuildable(root, files, seen)
            if problem:
                for rel in files:
                    (root / rel).unlink(missing_ok=True)
                out.lines.append(f"part {part}: {problem}; its files removed")
                continue
            sizes = {rel: RecordedFile((root / rel).stat().st_size, sha256_of(root / rel))
                     for rel in files}
            ledger.commit(part, files, statuses, sum(r.bytes for r in sizes.values()), sizes)
            seen.update(pid for pid, _ in statuses)
            out.lines.append(f"part {part}: recorded ({len(statuses)} params)")
    return out


class CannotRebuild(OutputError):
    """A lost ledger cannot be rebuilt: the manifest naming the job is missing or bad."""


def _manifest_naming_the_job(root: Path) -> dict[str, object]:
    """The manifest, if it names the job (job_id, fingerprint); else CannotRebuild saying
    what is wrong with it and what to do."""
    path = root / MANIFEST
    keep = (f"to keep the parts, move {', '.join(d + '/' for d in DATASET_DIRS)} out of "
            f"{root} (then rerun the job, or point its output elsewhere)")
    try:
        manifest = read_manifest(root)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        # A manifest, even a bad one, marks the directory as tidegate's: --restart is
        # allowed there.
        raise CannotRebuild(
            f"cannot rebuild the ledger {root / LEDGER}: {path} cannot be read as JSON "
            f"({str(exc).splitlines()[0][:200]}), and it names the job the parts belong to. "
            f"{keep[0].upper()}{keep[1:]}; or rerun with --restart to discard the output"
        ) from None
    if manifest is None:
        # Without a manifest or ledger, `tidegate run` takes the directory for someone
        # else's and refuses it (--restart too), so that is not offered.
        raise CannotRebuild(
            f"cannot rebuild the ledger {root / LEDGER}: {path} is missing (it names the "
            f"job, job_id and fingerprint, the parts belong to). {keep[0].upper()}{keep[1:]}"
        )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("job_id"), str) \
            or not isinstance(manifest.get("fingerprint"), str):
        raise CannotRebuild(
            f"cannot rebuild the ledger {root / LEDGER}: {path} names no job (a JSON "
            f"object with the strings job_id and fingerprint). {keep[0].upper()}{keep[1:]}"
            "; or rerun with --restart to discard the output"
        )
    return manifest


def _rebuildable(root: Path, files: list[str], seen: set[str]
                 ) -> tuple[str, list[tuple[str, str]]]:
    params = [f for f in files if f.startswith("params/")]
    if not params:
        return "no params part", []
    try:
        tables = {rel: pq.read_table(root / rel) for rel in files}
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"unreadable Parquet ({str(exc).splitlines()[0][:200]})", []
    rows = tables[params[0]].select(["param_id", "status"]).to_pylist()
    ids = [r["param_id"] for r in rows]
    if len(ids) != len(set(ids)) or seen & set(ids):
        return "param ids repeated (in this part or an earlier one)", []
    for rel, table in tables.items():
        if rel != params[0] and not set(table.column("param_id").to_pylist()) <= set(ids):
            return f"{rel} holds rows of params its params part lacks", []
    return "", [(r["param_id"], r["status"]) for r in rows]


def report_json(root: Path, damage: list[Damage], repaired: Repaired | None,
                notes: list[str]) -> str:
    return json.dumps({
        "output": str(root),
        "clean": not damage,
        "damage": [{"part": d.part, "file": d.file, "problem": d.problem} for d in damage],
        "notes": notes,
        "repaired": repaired.lines if repaired else [],
    })
