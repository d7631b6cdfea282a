"""A batch run's folder in object storage: who owns it, where an attempt writes, and the commit.

Layout under ``<output>/<run_id>/``::

    _r2ray_lock.json                      the lease of the run now running (r2ray.lease)
    _r2ray_run.json                       the marker, written first: this folder is r2ray's
    attempt-<stamp>-<hex>/                one attempt at the run
        routed/model=<name>/part-*.parquet   routed prompts, one folder per model (name escaped)
        quarantine/part-*.parquet            rows that could not be routed, a reason each
        deferred/part-*.parquet              rows the budget could not pay for
        report.md, spend.png                 for people
    manifest.json                         written LAST: the commit point; names its attempt

Consumers trust a run only once ``manifest.json`` exists, and read the routed prompts from the
folders it names. Safety rules, in order:

- One run of a run id at a time: a second is refused while the first holds the lease.
- r2ray never removes what it did not write: a folder without the marker is refused unless empty
  (or holding only a lease), and inside a marked folder only ``attempt-*`` folders that no manifest names are ever removed.
- An interrupted run (marker, no manifest) is redone in a new attempt; its old attempts are cleared.
- A committed run is left alone unless forced; a forced run builds a new attempt beside the old one
  and swaps by overwriting ``manifest.json`` (one atomic write), so a failed forced run leaves the
  committed run intact. Superseded attempts are removed only after the new manifest is written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import glob
import hashlib
import json
import posixpath
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from r2ray import __version__, storage
from r2ray.errors import R2RayError
from r2ray.redaction import redact_uri, redact_values

MANIFEST = "manifest.json"
MARKER = "_r2ray_run.json"
LOCK = "_r2ray_lock.json"
ATTEMPT_PREFIX = "attempt-"


class AlreadyCommitted(R2RayError):
    """The run id is committed; re-running it is a no-op unless forced."""


class RunFolderError(R2RayError):
    """The run folder cannot be used safely (not r2ray's, not writable, holds the input)."""


@dataclass(frozen=True)
class RunPaths:
    """The run folder ``<output>/<run_id>/`` and one attempt inside it."""

    output: str
    run_id: str
    attempt: str = ""

    @property
    def root(self) -> str:
        return storage.join(self.output, self.run_id)

    def path(self, *parts: str) -> str:
        """A path inside the attempt folder (the run folder when no attempt is set)."""
        return storage.join(self.root, *([self.attempt] if self.attempt else []), *parts)

    @property
    def routed(self) -> str:
        return self.path("routed")

    @property
    def quarantine(self) -> str:
        return self.path("quarantine")

    @property
    def deferred(self) -> str:
        return self.path("deferred")

    @property
    def manifest(self) -> str:
        return storage.join(self.root, MANIFEST)

    @property
    def marker(self) -> str:
        return storage.join(self.root, MARKER)

    @property
    def lock(self) -> str:
        return storage.join(self.root, LOCK)


def is_committed(paths: RunPaths) -> bool:
    return storage.exists(paths.manifest)


def read_manifest(paths_or_uri: RunPaths | str) -> dict:
    """A committed run's manifest; an error naming it where it is not a JSON object (a bare
    JSONDecodeError named no file, and Serve's start reads every run's under a folder)."""
    uri = paths_or_uri.manifest if isinstance(paths_or_uri, RunPaths) else paths_or_uri
    try:
        record = json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise R2RayError(f"{redact_uri(uri)} is not a readable manifest: {err}") from None
    if not isinstance(record, dict):
        raise R2RayError(f"{redact_uri(uri)} is not a readable manifest: not a JSON object")
    return record


def committed_paths(paths: RunPaths) -> RunPaths:
    """The paths of the committed attempt (``attempt`` empty for runs from before attempts)."""
    return RunPaths(paths.output, paths.run_id, read_manifest(paths).get("attempt", ""))


def children(uri: str) -> list[str]:
    """Base names directly under a folder (none if it does not exist)."""
    fs, path = storage.filesystem(uri)
    try:   # ls, not exists(): exists() reads an unreachable store as "no such folder"
        listing = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    if listing == [path] and fs.isfile(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in listing)


def check_output(paths: RunPaths, input_files: list[str], input_uri: str | None = None) -> None:
    """Refuse a run folder r2ray may not write into, before anything is written or removed;
    and an input (``input_uri``, as given) that sweeps in the output folder's runs."""
    names = children(paths.root)   # first: it raises at once where the store is unreachable
    for uri in (paths.output, paths.root):
        fs_, path = storage.filesystem(uri)
        if fs_.isfile(path):
            raise RunFolderError(f"output {uri} is a file, not a folder")
    for source in input_files:
        if _below(source, paths.root):
            raise RunFolderError(f"input file {source} lies inside the run folder {paths.root}; "
                                 "choose another --output or --run-id")
    if input_uri is not None and not _below(input_uri, paths.output):
        swept = next((source for source in input_files if _below(source, paths.output)), None)
        if swept is not None:
            raise RunFolderError(
                f"input {input_uri} holds the output {paths.output} (it reads {swept}): each "
                "night would route again the earlier runs' deferred rows and quarantine their "
                "manifests; choose an --output outside the input (a deferred/ folder passed "
                "as --input itself is fine)")
    if set(names) - set(lease_files(names)) and MARKER not in names:   # a run is starting here
        raise RunFolderError(
            f"{paths.root} exists and is not an r2ray run folder (no {MARKER}; it holds "
            f"{', '.join(names[:5])}{', …' if len(names) > 5 else ''}); r2ray will not write into "
            "or clear it — choose another --run-id or --output, or move its contents away")


def lease_files(names: list[str]) -> list[str]:
    """The names among a folder's that are a run's lease (:mod:`r2ray.lease`): the lock, and what
    creating or changing it leaves for milliseconds (its claims ``<lock>.takeover-*``, their and
    the lock's temporary files ``*.tmp-*``), or for good where a run was killed in them. Read as
    not r2ray's, a run starting beside one that renewed its lease before writing its marker was
    told to move a live run's files away."""
    return [name for name in names if name.startswith(LOCK)]


def _below(uri: str, folder: str) -> bool:
    """``uri`` lies strictly inside ``folder``, however either is spelt (a symlink, ``..``,
    ``file://``: :func:`r2ray.storage.canonical_uri`)."""
    return storage.canonical_uri(uri).startswith(storage.canonical_uri(folder).rstrip("/") + "/")


def start_attempt(paths: RunPaths, fingerprint: str, force: bool = False) -> tuple[RunPaths, str]:
    """Mark the run folder as r2ray's and open a new attempt; returns (attempt paths, state).

    ``state`` is 'fresh', 'redo' (an interrupted run's attempts were cleared) or 'forced' (a
    committed run is being rebuilt beside itself). Raises :class:`AlreadyCommitted` for a
    committed run unless ``force``. Call :func:`check_output` first.
    """
    committed = is_committed(paths)
    if committed and not force:
        raise AlreadyCommitted(f"run {paths.run_id} is already committed at {paths.manifest}; "
                               "pass --force to redo it")
    names = children(paths.root)
    state = "forced" if committed else ("redo" if MARKER in names else "fresh")
    if not committed:
        remove_attempts(paths, keep="")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    attempt = RunPaths(paths.output, paths.run_id, f"{ATTEMPT_PREFIX}{stamp}-{secrets.token_hex(3)}")
    marker = {"run_id": paths.run_id, "input_fingerprint": fingerprint, "attempt": attempt.attempt,
              "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "r2ray_version": __version__}
    with writing_to(paths):
        storage.write_text(paths.marker, json.dumps(marker, indent=2) + "\n")
    return attempt, state


@contextlib.contextmanager
def writing_to(paths: RunPaths):
    """A run's first writes (its lease, its marker) are also the write probe: an unwritable
    output fails there, before any work, in one line."""
    try:
        yield
    except (OSError, ValueError) as err:   # PermissionError is an OSError
        raise RunFolderError(f"cannot write to the output {paths.root}: "
                             f"{type(err).__name__}: {err}") from None


def remove_attempts(paths: RunPaths, keep: str) -> None:
    """Remove the run's ``attempt-*`` folders except ``keep`` (only folders r2ray wrote)."""
    names = children(paths.root)
    if MARKER not in names:
        return
    for name in names:
        if name.startswith(ATTEMPT_PREFIX) and name != keep:
            storage.remove(storage.join(paths.root, name))


def abandon(attempt: RunPaths, state: str) -> None:
    """Undo a failed attempt: its folder, and the marker too if this attempt created the folder."""
    storage.remove(attempt.path())
    if state == "fresh":
        storage.remove(attempt.marker)
        remove_if_empty(attempt.root)


def remove_if_empty(uri: str) -> None:
    """Remove the folder ``uri`` if nothing is left in it (a run that made it and failed). One
    that another run has just written in (its lease) stays, and one another run has just removed
    is gone: neither is a failure to remove it."""
    fs, root = storage.filesystem(uri)
    if not fs.exists(root) or children(uri):
        return
    try:
        fs.rmdir(root)
    except FileNotFoundError:   # removed meanwhile; object stores have no empty folders
        pass
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):   # EEXIST: POSIX allows either
            raise


def commit(attempt: RunPaths, manifest: dict) -> None:
    """Write the manifest (:func:`write_manifest`), then drop the attempts it supersedes."""
    write_manifest(attempt, manifest)
    drop_superseded(attempt)


def write_manifest(attempt: RunPaths, manifest: dict) -> None:
    """The commit itself: the last write of a run, in one write (``manifest['attempt']`` is set
    to name its attempt)."""
    manifest["attempt"] = attempt.attempt
    stored = redact_values(manifest)   # URIs (tracking, input, output) may carry credentials
    storage.write_text(attempt.manifest, json.dumps(stored, indent=2, sort_keys=True) + "\n")


def drop_superseded(attempt: RunPaths) -> None:
    """After the commit, the attempts its manifest no longer names (a run stopped here is
    committed all the same)."""
    remove_attempts(attempt, keep=attempt.attempt)


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
    """URI of the newest committed manifest under ``output`` (by its ``committed_at``) that has a
    solve (a run whose every row was quarantined priced nothing), if any."""
    fs, path = storage.filesystem(output)
    if not fs.exists(path):
        return None
    # the folder's own name is literal: in ``runs[1]`` a ``[1]`` is no wildcard matching ``runs1``
    manifests = fs.glob(f"{glob.escape(path.rstrip('/'))}/*/{MANIFEST}")
    best, best_time = None, ""
    for manifest in manifests:
        uri = storage.with_scheme(fs, manifest)
        record = read_manifest(uri)
        committed_at = record.get("committed_at", "")
        if record.get("solve") and committed_at >= best_time:
            best, best_time = uri, committed_at
    return best


def routed_partition(model: str) -> str:
    """The hive folder of a model's routed prompts: ``model=<name>``, the name percent-escaped
    (``/``, ``=``, ``%``, spaces, unicode), so a name is never a path and reads back exactly
    through pyarrow's and Ray Data's hive partitioning."""
    return f"model={quote(model, safe='')}"
