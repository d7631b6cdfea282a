"""The work folder of a collection or an execution: resumable parts, a manifest written last.

A run removes the old manifest before it issues a call (so no manifest ever disagrees with the
parts beside it) and writes the new one after its output, as the batch job commits a run."""

from __future__ import annotations

import datetime as dt
import json

from r2ray import storage

MANIFEST = "manifest.json"


def open_work(work_dir: str) -> None:
    storage.remove(storage.join(work_dir, MANIFEST))


def commit_work(work_dir: str, manifest: dict) -> None:
    manifest["committed_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    storage.write_text(storage.join(work_dir, MANIFEST),
                       json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
