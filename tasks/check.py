"""Integrity checks over the catalog: `geofeat check`, and the build flow's gate.

Each property is a named `Check` (pass/fail, a detail line, up to SHOW offending rows):
- files: every Parquet file under a table folder is listed by a completion record, and every
  listed file exists (a missing one breaks every view); no temp files or folders of dead writers
  remain anywhere under the root (a build sweeps them first);
- one split per image (the `images` view's promise), and images shared across datasets (info);
- crops carry their image's split and country (a stale crop file misleads raw-Parquet readers);
- no features / segmentations / predictions rows without their image;
- no duplicate rows in any table (two runs that did the same work), and copies of an image (the
  same bytes) agree on its country;
- known quarantine reasons; registered experts whose checkpoint still exists.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from storage import sources
from storage.layout import DataRoot
from storage.publish import leftovers
from storage.queries import SHOW, catalog
from storage.schema import TABLES
from storage.shards import audit_files
from tasks.report import Check, checks_markdown
from tasks.validate import REASONS

log = logging.getLogger(__name__)


class IntegrityError(RuntimeError):
    """The catalog failed an integrity check; the message lists every failure."""


def _listed_table(rows: list[dict], names: list[str]) -> pa.Table:
    return pa.Table.from_pylist(rows[:SHOW], schema=pa.schema([(n, pa.string()) for n in names]))


def file_checks(root: DataRoot) -> list[Check]:
    """Shard files against completion records, from listings alone (no view needed)."""
    audit = audit_files(root, list(TABLES))
    orphans, missing = audit.orphans, audit.missing
    return [
        Check("every shard file has a completion record", not orphans,
              f"{len(orphans)} of {audit.on_disk} Parquet files are in no completion record (left by a killed or "
              "failed run; the views ignore them; a rerun over the same inputs commits them, else delete them)"
              if orphans else f"{audit.on_disk} Parquet files, all committed",
              _listed_table([{"file": p} for p in orphans], ["file"])),
        Check("every committed file exists", not missing,
              f"{len(missing)} files listed by completion records are gone: the views cannot load; "
              "delete those records and rerun the stage" if missing else f"{audit.listed} committed files present",
              _listed_table([{"file": p, "record": r} for p, r in missing], ["file", "record"])),
    ]


def leftover_check(root: DataRoot) -> Check:
    """Temp files and folders under the root: a dead writer's are leftovers (a build sweeps them
    when it starts), a running writer's are work in progress."""
    found = leftovers(root.url)
    dead = [t for t in found if not t.alive]
    busy = len(found) - len(dead)
    detail = (f"{len(dead)} temp file(s) or folder(s) of writers that died (a killed run): the views never "
              "read them; the next build removes them, or delete them" if dead else "none")
    if busy:
        detail += f"; {busy} of running writers (work in progress)"
    rows = [{"path": t.path, "pid": str(t.pid), "age_s": "" if t.age_s is None else f"{t.age_s:.0f}"} for t in dead]
    return Check("no leftovers of dead writers", not dead, detail, _listed_table(rows, ["path", "pid", "age_s"]))


def sql_checks(root: DataRoot) -> list[Check]:
    """The checks that need the views (built fresh from the completion records)."""
    try:
        with catalog(root, fresh=True) as cat:
            cat.load_every_table()
            found = cat.integrity(sorted(REASONS))
            shared = cat.shared_images()
            experts = cat.expert_uris()
    except Exception as exc:  # noqa: BLE001 - e.g. a committed file is gone or corrupt
        return [Check("catalog loads", False, f"the views cannot be read: {type(exc).__name__}: {exc}")]
    checks = [Check(o.name, o.count == 0, f"{o.count} {o.meaning}" if o.count else "ok", o.rows) for o in found]
    checks.append(Check("images shared across datasets (info)", True, f"{shared.count} {shared.meaning}", shared.rows))
    gone = [{"expert_id": eid, "uri": uri} for eid, uri in experts if not sources.exists(f"{uri}/config.json")]
    checks.append(Check("expert checkpoints exist", not gone,
                        f"{len(gone)} of {len(experts)} registered experts have no checkpoint at their uri"
                        if gone else f"{len(experts)} experts, all present",
                        _listed_table(gone, ["expert_id", "uri"])))
    return checks


def integrity_checks(root: DataRoot) -> list[Check]:
    """Every integrity property of the catalog under `root`, passing or not."""
    return file_checks(root) + [leftover_check(root)] + sql_checks(root)


# Failures a build cannot cause and cannot repair: the gate logs them (and `geofeat check` fails on
# them) but does not fail the build. A stale crop split means experts trained before an image moved
# to test saw it: retrain. Rows without an image are dead data the views already hide. Copies with
# different countries are a labelling problem of the sources. Leftovers are invisible to the views.
GATE_WARNS = {"crops carry their image's split and country", "no rows without their image",
              "expert checkpoints exist", "copies of an image agree on its country", "no leftovers of dead writers"}


def gate(root: DataRoot, checks: list[Check] | None = None) -> list[Check]:
    """Run the checks (unless given); raise IntegrityError naming every blocking failure, else return them."""
    checks = integrity_checks(root) if checks is None else checks
    for c in checks:
        if not c.passed and c.name in GATE_WARNS:
            log.warning("integrity (not blocking the build): %s: %s", c.name, c.detail)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed and c.name not in GATE_WARNS]
    if failed:
        raise IntegrityError(f"catalog {root.url} failed {len(failed)} integrity check(s): " + "; ".join(failed)
                             + ". `geofeat check` shows the offending rows")
    return checks


def integrity_markdown(checks: list[Check]) -> str:
    return checks_markdown("Catalog integrity", checks, failed_rows_only=True, show=SHOW)
