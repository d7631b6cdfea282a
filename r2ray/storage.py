"""Object storage through fsspec: local paths, ``file://`` and ``s3://`` behave the same.

S3 settings come from the environment (never from arguments that end up in logs):
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` as usual, and ``R2RAY_S3_ENDPOINT`` (or the
standard ``AWS_ENDPOINT_URL``) for an S3-compatible server such as SeaweedFS or MinIO.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from r2ray.errors import R2RayError
from r2ray.redaction import redact_text, redact_uri

log = logging.getLogger(__name__)


def s3_options() -> dict:
    """s3fs keyword arguments from the environment: endpoint only; keys stay in the environment.

    s3fs's listings cache is off: one filesystem serves the whole process, and a folder listed
    once was answered from memory ever after, blind to what other hosts write. A run that had
    listed its folder read a lock another run had just taken as absent (refused as "changed
    hands", not by its holder's name), a manifest another run had just committed as missing, and
    one it had rewritten as expired (FileExpired, its cached ETag)."""
    endpoint = os.environ.get("R2RAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and redact_uri(endpoint) != endpoint:  # botocore would quote it back in errors
        raise R2RayError(f"the S3 endpoint {redact_uri(endpoint)} (R2RAY_S3_ENDPOINT or "
                         "AWS_ENDPOINT_URL) carries credentials; give the server's URL alone and "
                         "the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    options: dict = {"use_listings_cache": False}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
        options["config_kwargs"] = {"s3": {"addressing_style": "path"}}
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a path or URI."""
    uri = str(uri)
    options = {}
    if uri.startswith(("s3://", "s3a://")):
        refuse_s3_credentials(uri)
        options = s3_options()
    return url_to_fs(uri, **options)


def refuse_s3_credentials(uri: str) -> None:
    """s3fs takes no keys from a URI: ``s3://KEY:SECRET@bucket/…`` names a bucket
    ``KEY:SECRET@bucket``, which botocore quotes back whole in its error (and a signed query, a
    key ``k?X-Amz-Signature=…``). Refused here, naming the URI redacted."""
    if redact_uri(uri) != uri:
        raise R2RayError(f"{redact_uri(uri)} carries credentials; give the URI alone and the keys "
                         "in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """The filesystem is the local disk (``file://`` or a plain path)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def temporary_path(path: str) -> str:
    """A name beside local ``path`` to write under before renaming onto it: unique per process
    and call, so two writers of one path (threads, a retried task) never share it. Readers skip
    it: :func:`list_files` takes only data suffixes."""
    return f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def publish(tmp: str, path: str) -> None:
    """Rename the finished local file ``tmp`` onto ``path`` durably: its bytes are flushed to the
    disk first and the folder's new entry after. Without the first ``fsync`` a power loss soon
    after a commit can leave ``path`` present but empty (ext4 and xfs write a new file's data
    later than the rename); the manifest would then name a part that lost its rows."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_folder(os.path.dirname(path) or ".")


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:   # a platform whose folders cannot be opened: the rename is what it offers
        return
    try:
        os.fsync(fd)
    except OSError:   # some filesystems refuse fsync on a folder (EINVAL); the data is synced
        pass
    finally:
        os.close(fd)


def canonical_uri(uri: str) -> str:
    """One spelling per location: two URIs naming one file or folder get the same, whatever their
    spelling (``file://``, ``./``, ``a/../b``, a trailing ``/``; locally also ``~``, a relative
    path and symlinks, resolved as this process sees them): what tells an output from an input,
    and what labels a model folder where labels must match across runs."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return os.path.realpath(path)
    return with_scheme(fs, posixpath.normpath(path))


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (for Ray Data and pyarrow.dataset) plus the path inside it."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without mangling the ``scheme://``."""
    uri = str(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def with_scheme(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open(path, "r", encoding="utf-8") as handle:
        return handle.read()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files go through a temp name + a durable rename
    (:func:`publish`) so readers never see half; a write that fails (a full disk, a rename
    refused) removes its temporary file and raises."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            publish(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.remove(tmp)
            raise
    else:  # object stores: a single PUT is atomic
        with fs.open(path, "wb") as handle:
            handle.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write a whole new object unless ``uri`` already exists: True if this call created it,
    False if it was there. The check and the write are one step, so of two callers at once only
    one gets True: locally a hard link of a complete temporary file (``link`` fails on an existing
    name, and a reader never sees the file half written); on an object store a PUT with
    ``If-None-Match: *`` (s3fs's ``"xb"`` mode; fsspec's memory store checks it too)."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return _link_new(path, data)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        return False
    except OSError as err:
        if _precondition_failed(err):
            return False
        raise
    return True


_FOLDER_TRIES = 3   # times the local folder is made again when it vanishes (see _link_new)


def _precondition_failed(err: OSError) -> bool:
    """An object store's 412 to the ``If-None-Match: *`` PUT: the object exists. s3fs reads a
    412 as FileExistsError only when the reply names its condition; SeaweedFS's does not, so
    s3fs raises EINVAL with the 412 as its cause (the PUT carries no other condition)."""
    response = getattr(err.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return err.errno == errno.EINVAL and (code in ("PreconditionFailed", "412") or status == 412)


def _link_new(path: str, data: bytes) -> bool:
    """:func:`create_exclusive` on the local disk. The folder is made again where it vanished
    before the temporary file was written in it: a run releasing its lease removes the run folder
    it left empty, and another run taking the lease at that moment failed ("cannot write to the
    output …: No such file or directory", or makedirs' own "File exists")."""
    folder = os.path.dirname(path) or "."
    for tries_left in reversed(range(_FOLDER_TRIES)):
        with suppress(FileExistsError):   # os.makedirs found it, and it was gone when it looked
            os.makedirs(folder, exist_ok=True)
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as handle:   # once written, the folder is not empty: it stays
                handle.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:   # the name is taken
            return False
        except FileNotFoundError:   # the folder was removed (and maybe made again) meanwhile
            if not tries_left:
                raise
        finally:
            with suppress(OSError):
                os.remove(tmp)
    raise AssertionError("unreachable: the last try returns or raises")


def remove(uri: str, recursive: bool = True) -> None:
    """Remove ``uri`` (and, ``recursive``, what lies under it) by its literal name.

    An object store's ``rm`` (s3fs, fsspec's memory store) reads ``[``, ``*`` and ``?`` as a
    glob, so ``runs[1]/r/_r2ray_run.json`` would remove ``runs1/r/_r2ray_run.json`` and keep
    its own: such a name's objects are removed one by one, each under its own name."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return
    if is_local(fs) or not has_wildcard(path):   # the local rm takes names literally
        fs.rm(path, recursive=recursive)
        return
    for name in fs.find(path) if recursive else [path]:
        fs.rm_file(name)


def has_wildcard(path: str) -> bool:
    """The path holds a character fsspec's glob reads as a wildcard (``*``, ``?``, ``[``)."""
    return any(ch in path for ch in "*?[")


def list_files(uris: str | Iterable[str], suffixes: tuple[str, ...]) -> list[str]:
    """Expand files, directories/prefixes and globs into a sorted list of data-file URIs.

    Hidden files and names starting with ``_`` (``_SUCCESS``, ``_tmp``) are skipped; any other
    file of another suffix (a ``.csv`` beside the ``.parquet`` files) is skipped with a warning
    naming it, so it is never dropped without a word. An input that matches nothing is an error
    naming it, so a typo never reads as an empty backlog. A name that exists is taken as it is:
    ``night[1].jsonl`` is that file, not a glob matching ``night1.jsonl``.
    """
    found: list[str] = []
    for uri in [uris] if isinstance(uris, str) else list(uris):
        fs, path = filesystem(uri)
        glob = has_wildcard(path) and not fs.exists(path)
        if glob:
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = fs.find(path)
        elif fs.exists(path):
            paths = [path]
        else:
            raise FileNotFoundError(f"input {redact_uri(uri)} does not exist")
        base = (_glob_root(path) if glob else path).rstrip("/")
        visible = [   # skip hidden/underscore names at any level below the input (_temporary/)
            p for p in paths
            if not any(part.startswith((".", "_"))
                       for part in (p[len(base):] if p.startswith(base + "/") else
                                    posixpath.basename(p)).split("/") if part)
        ]
        matched = [p for p in visible if p.endswith(suffixes)]
        other = [p for p in visible   # only a glob lists folders: a find lists files alone
                 if not p.endswith(suffixes) and not (glob and fs.isdir(p))]
        if matched and other:
            log.warning("input %s: %d file(s) not ending in %s skipped: %s%s", redact_uri(uri),
                        len(other), ", ".join(suffixes),
                        ", ".join(posixpath.basename(p) for p in other[:5]),
                        " …" if len(other) > 5 else "")
        if not matched:
            raise FileNotFoundError(f"input {redact_uri(uri)} holds no files ending in "
                                    f"{', '.join(suffixes)}")
        found.extend(with_scheme(fs, p) for p in sorted(matched))
    return found


def _glob_root(path: str) -> str:
    """The folders of a glob before its first wildcard: what a wildcard matches below them is
    "below the input", so ``data/**/*.parquet`` skips ``data/_temporary/`` as ``data`` does."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if has_wildcard(part))
    return "/".join(parts[:fixed])


class StorageError(R2RayError):
    """Object storage could not be reached or used (endpoint down, bad credentials, no access)."""


@contextmanager
def reporting(action: str) -> Iterator[None]:
    """Turn storage failures (botocore, s3fs, OS errors) into one readable line naming ``action``;
    a missing file stays a FileNotFoundError (the CLI prints it as one line too)."""
    try:
        yield
    except (R2RayError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 — s3fs surfaces botocore, aiohttp and OS errors alike
        if not _is_storage_error(err):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StorageError(redact_text(f"{action}: {type(err).__name__}: {message}")) from None


def _is_storage_error(err: Exception) -> bool:
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in (
        "botocore", "aiobotocore", "aiohttp", "s3fs")
