"""The work folder of a collection or an execution: resumable parts, a manifest written last.

A run removes the old manifest before it issues a call (so no manifest ever disagrees with the
parts beside it) and writes the new one after its output, as the batch job commits a run. It
first checks the folder is a work folder: its ``manifest.json`` is removed and rewritten, so a
folder whose ``manifest.json`` is another's (a committed batch run's, a project's) is refused.

A folder may also be bound to what it answers (``binding``: an execution to its run): the binding
is written in ``work.json`` when the folder is opened first, and a folder bound to another is
refused, since its recorded calls would answer the same requests of this one unsent."""

from __future__ import annotations

import datetime as dt
import json

from r2ray import storage
from r2ray.errors import R2RayError
from r2ray.manifest import MARKER, children, lease_files

MANIFEST = "manifest.json"
BINDING = "work.json"
WORK_KINDS = ("execute", "bench-collect")   # the ``kind`` of the manifests commit_work writes


class WorkFolderError(R2RayError):
    """The work folder is not one r2ray may write in (a batch run's, another's manifest, or bound
    to another run)."""


def open_work(work_dir: str, binding: dict | None = None) -> None:
    """Check the folder (:func:`check_work`), remove its manifest and bind it to ``binding``
    where it is bound to nothing yet."""
    check_work(work_dir, binding)
    storage.remove(storage.join(work_dir, MANIFEST))
    uri = storage.join(work_dir, BINDING)
    if binding is not None and not storage.exists(uri):
        storage.write_text(uri, json.dumps(binding, indent=2, sort_keys=True) + "\n")


def check_work(work_dir: str, binding: dict | None = None) -> None:
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
    if binding is not None:
        check_binding(work_dir, names, binding)


def check_binding(work_dir: str, names: list[str], binding: dict) -> None:
    """Refuse a folder bound to another (its ``work.json``; a folder from before it was written:
    its committed manifest, where of the same kind) where a field both name differs: nightly
    backlogs reuse query ids, so another run's recorded calls answered this one's, none sent,
    their bills labelled as this run's."""
    held = (_document(storage.join(work_dir, BINDING)) if BINDING in names else
            _document(storage.join(work_dir, MANIFEST)) if MANIFEST in names else {})
    if BINDING not in names and held.get("kind") != binding.get("kind"):
        return   # unbound, and no manifest of this kind: nothing to compare
    differ = [f"{name} {held[name]!r} there, {value!r} here" for name, value in binding.items()
              if name in held and held[name] != value]
    if differ:
        raise WorkFolderError(f"work folder {work_dir} holds the calls of another run "
                              f"({'; '.join(differ)}): its recorded answers would stand for this "
                              "run's, unsent and billed as they were — give a fresh --work (a "
                              "rerun of that run resumes there)")


def _kind(uri: str) -> str | None:
    """The ``kind`` of a JSON manifest (None: unreadable, not a JSON object, or none named)."""
    return _document(uri).get("kind")


def _document(uri: str) -> dict:
    """A JSON object file ({}: unreadable, or not a JSON object)."""
    try:
        document = json.loads(storage.read_text(uri))
    except (OSError, ValueError):   # a folder of that name, bytes that are no UTF-8 JSON
        return {}
    return document if isinstance(document, dict) else {}


def commit_work(work_dir: str, manifest: dict) -> None:
    manifest["committed_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    storage.write_text(storage.join(work_dir, MANIFEST),
                       json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
