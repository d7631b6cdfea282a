"""A batch run's folder in object storage, and its commit point.

Layout under ``<output>/<run_id>/``::

    routed/model=<name>/part-*.parquet   routed prompts, one folder per model
    quarantine/part-*.parquet            rows that could not be routed, a reason each
    report.md, spend.png                 for people
    manifest.json                        written LAST: the commit point

Consumers trust a run only once ``manifest.json`` exists. A run id without a manifest is an
interrupted run: running it again clears what it left and redoes it, so no part is ever duplicated.
A committed run id is left alone unless forced.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from r2ray import storage
from r2ray.errors import R2RayError

MANIFEST = "manifest.json"


class AlreadyCommitted(R2RayError):
    """The run id is committed; re-running it is a no-op unless forced."""


@dataclass(frozen=True)
class RunPaths:
    output: str
    run_id: str

    @property
    def root(self) -> str:
        return storage.join(self.output, self.run_id)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def routed(self) -> str:
        return self.path("routed")

    @property
    def quarantine(self) -> str:
        return self.path("quarantine")

    @property
    def manifest(self) -> str:
        return self.path(MANIFEST)


def is_committed(paths: RunPaths) -> bool:
    return storage.exists(paths.manifest)


def read_manifest(paths_or_uri: RunPaths | str) -> dict:
    uri = paths_or_uri.manifest if isinstance(paths_or_uri, RunPaths) else paths_or_uri
    return json.loads(storage.read_text(uri))


def prepare_run(paths: RunPaths, force: bool = False) -> str:
    """Make the run folder ready; returns 'fresh', 'redo' (interrupted run cleared) or 'forced'.

    Raises :class:`AlreadyCommitted` for a committed run unless ``force``.
    """
    if is_committed(paths):
        if not force:
            raise AlreadyCommitted(
                f"run {paths.run_id} is already committed at {paths.manifest}; "
                "pass --force to redo it")
        storage.remove(paths.manifest)  # un-commit first, so a crash below leaves no stale commit
        storage.remove(paths.root)
        return "forced"
    if storage.exists(paths.root):
        storage.remove(paths.root)
        return "redo"
    return "fresh"


def commit(paths: RunPaths, manifest: dict) -> None:
    """Write the manifest, the last write of a run."""
    storage.write_text(paths.manifest, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def input_fingerprint(files: list[str]) -> str:
    """sha256 over each input file's URI, size and version tag (ETag or mtime): cheap, no reads."""
    digest = hashlib.sha256()
    for uri in files:
        fs, path = storage.filesystem(uri)
        info = fs.info(path)
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        digest.update(f"{uri}\0{info.get('size')}\0{tag}\n".encode())
    return digest.hexdigest()


def latest_committed(output: str) -> str | None:
    """URI of the newest committed manifest under ``output`` (by its ``committed_at``), if any."""
    fs, path = storage.filesystem(output)
    if not fs.exists(path):
        return None
    manifests = [p for p in fs.glob(f"{path.rstrip('/')}/*/{MANIFEST}")]
    best, best_time = None, ""
    for manifest in manifests:
        uri = storage.with_scheme(fs, manifest)
        committed_at = read_manifest(uri).get("committed_at", "")
        if committed_at >= best_time:
            best, best_time = uri, committed_at
    return best
