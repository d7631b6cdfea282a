"""The work folder of a collection or an execution: resumable parts, a manifest written last.

A run removes the old manifest before it issues a call (so no manifest ever disagrees with the
parts beside it) and writes the new one after its output, as the batch job commits a run. It
first checks the folder is a work folder: its ``manifest.json`` is removed and rewritten, so a
folder whose ``manifest.json`` is another's (a committed batch run's, a project's) is refused."""

from __future__ import annotations

import datetime as dt
import json

from r2ray import storage
from r2ray.errors import R2RayError
from r2ray.manifest import MARKER, children, lease_files

MANIFEST = "manifest.json"
WORK_KINDS = ("execute", "bench-collect")   # the ``kind`` of the manifests commit_work writes


class WorkFolderError(R2RayError):
    """The work folder is not one r2ray may write in (a batch run's, or another's manifest)."""


def open_work(work_dir: str) -> None:
    check_work(work_dir)
    storage.remove(storage.join(work_dir, MANIFEST))


def check_work(work_dir: str) -> None:
    """Refuse a batch run folder (it holds ``_r2ray_run.json``, or in a run's first moments
    only its lease's ``_r2ray_lock.json*``) and a folder whose ``manifest.json`` no collection or
    execution wrote, before anything there is touched."""
    names = children(work_dir)
    run_files = [name for name in names if name == MARKER] + lease_files(names)
    if run_files:
        raise WorkFolderError(f"work folder {work_dir} is a batch run folder (it holds "
                              f"{run_files[0]}); give another --work: a run folder is r2ray "
                              "route's alone")
    if MANIFEST in names and _kind(storage.join(work_dir, MANIFEST)) not in WORK_KINDS:
        raise WorkFolderError(f"work folder {work_dir} holds a {MANIFEST} that no collection or "
                              "execution wrote; r2ray would replace it — give another --work, or "
                              "move it away")


def _kind(uri: str) -> str | None:
    """The ``kind`` of a JSON manifest (None: unreadable, not a JSON object, or none named)."""
    try:
        document = json.loads(storage.read_text(uri))
    except (OSError, ValueError):   # a folder of that name, bytes that are no UTF-8 JSON
        return None
    return document.get("kind") if isinstance(document, dict) else None


def commit_work(work_dir: str, manifest: dict) -> None:
    manifest["committed_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    storage.write_text(storage.join(work_dir, MANIFEST),
                       json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
