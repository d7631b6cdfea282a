"""Embeddings once: a cache of query embeddings keyed by the encoder's fingerprint and each text's
hash, so ``r2ray train`` → ``r2ray evaluate`` → promotion encode a bench's queries one time.

Encoding is the costliest step of training on text (MiniLM: ~140 short texts/s on 2 cores, ~5/s
per core at 256 tokens), and every command used to encode the same bench again. The cache lives
in ``R2RAY_EMBEDDING_CACHE`` (a folder; ``off`` turns it off), default
``~/.cache/r2ray/embeddings``, one sub-folder per encoder fingerprint (a hash of the model
folder's files: another model, or the same name with other weights, never shares vectors) and
precision (:func:`encoder_key`: bfloat16 vectors are not float32's). Each
encode that missed writes one Parquet shard (``text_sha256``, ``embedding``) under a unique name,
written whole and renamed, so concurrent processes never clash and a killed one leaves nothing
half-written. A shard that cannot be read, or whose page checksums do not match (a flipped bit
was otherwise read as a wrong vector), is skipped with a warning: the texts are encoded again.

The cache is bounded: after each shard it writes, the least recently used shards (a hit touches
its shard), of any encoder, go until all of them fit in ``R2RAY_EMBEDDING_CACHE_MAX_GB`` (GB,
10^9 bytes; default 5, about 3 million MiniLM texts), so benches and encoder upgrades never pile
up without end. The shard just written always stays. A process that only reads (every text a
hit) checks the bound once too, so a bound lowered since the last write is met without one.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CACHE_VARIABLE = "R2RAY_EMBEDDING_CACHE"
DEFAULT_CACHE = Path("~/.cache/r2ray/embeddings")
LIMIT_VARIABLE = "R2RAY_EMBEDDING_CACHE_MAX_GB"
DEFAULT_LIMIT_GB = 5.0
"""Embedding shards kept, all encoders together (GB, 10^9 bytes): a MiniLM vector is 1.5 KB."""


def cache_root(variable: str = CACHE_VARIABLE, default: Path = DEFAULT_CACHE) -> Path | None:
    """The cache folder the environment ``variable`` names (``default`` when unset), or None
    when it says ``off`` (or 0, false, no). The local LLM's converted-model cache reads its own
    variable through this too."""
    value = os.environ.get(variable, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return Path(value or default).expanduser()


def folder_fingerprint(folder: str) -> str:
    """sha256 (hex, 16 chars) over every file of a model folder (or of one file): relative path,
    size, contents. Remembered per process by :func:`files_key` (a few ms), so files changed
    since are hashed again."""
    return _content_fingerprint(folder, files_key(Path(folder), hashlib.sha256()))


def files_key(folder: Path, key) -> str:
    """``key`` (a hashlib object) updated with every file of ``folder`` (or ``folder`` itself
    when it is a file): its name, size and modification time (no contents read: a few ms); its
    hex digest, 16 characters."""
    for name, file in _files(folder):
        stat = file.stat()
        key.update(f"|{name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


def _files(path: Path) -> list[tuple[str, Path]]:
    """(name relative to ``path``, file) of every file under the folder ``path``, in path order;
    a file ``path`` is itself, under its own name."""
    if path.is_file():
        return [(path.name, path)]
    return [(str(file.relative_to(path)), file)
            for file in sorted(p for p in path.rglob("*") if p.is_file())]


@functools.lru_cache(maxsize=8)
def _content_fingerprint(folder: str, files: str) -> str:
    """:func:`folder_fingerprint` of ``folder`` whose files have :func:`files_key` ``files``."""
    digest = hashlib.sha256()
    for name, path in _files(Path(folder)):
        digest.update(name.encode())
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


FINGERPRINT_FORMAT = 1   # what a memo of :func:`remembered_fingerprint` holds; part of its key


def remembered_fingerprint(path: Path, root: Path | None) -> str:
    """:func:`folder_fingerprint` of ``path`` (a model folder or file), remembered in a memo under
    the cache folder ``root`` (None: hashed every time): the key that lets every install of the
    same files (another venv, clone or CI run) share one cached copy.

    Hashing MiniLM's 91 MB took 0.08-0.46 s (2 shared cores, 2026-12-06) at every start; the memo,
    keyed by ``path`` and its files' names, sizes and modification times (:func:`files_key`),
    answers in 2-8 ms. Files replaced by others of the same size and modification time are not
    noticed. Memos are a cache's entries like any other (:func:`evict_stale`)."""
    if root is None:
        return folder_fingerprint(str(path))
    key = hashlib.sha256(f"fingerprint {FINGERPRINT_FORMAT}|{path}".encode())
    memo = root / f"{path.name}-{files_key(path, key)}.fingerprint"
    try:
        known = memo.read_text().strip()
    except (OSError, UnicodeDecodeError):   # none yet (or unreadable): hash the files
        known = ""
    if re.fullmatch(r"[0-9a-f]{16}", known):
        touch(memo)
        return known
    fingerprint = folder_fingerprint(str(path))
    try:
        from r2ray import storage

        storage.write_bytes(str(memo), fingerprint.encode())
    except OSError as err:
        print(f"warning: cannot cache the fingerprint of {path} under {memo} ({err})",
              file=sys.stderr)
        return fingerprint
    evict_stale(memo, re.escape(path.name) + r"-[0-9a-f]{16}\.fingerprint")
    return fingerprint


KEEP_COPIES = 2
"""Copies of one source a cache keeps when it writes another: the most recently used (a use
touches its copy), so a reinstall or an upgrade leaves the old copy to go, not to pile up."""


def touch(entry: Path) -> None:
    """Mark a cache entry (file or folder) used now: its modification time orders
    :func:`evict_stale`. A read-only cache is still read."""
    try:
        os.utime(entry)
    except OSError:
        pass


def evict_stale(kept: Path, same_source: str, keep: int = KEEP_COPIES) -> list[Path]:
    """Remove, from the folder of the copy ``kept`` just written, the copies of the same source
    beyond the ``keep`` most recently used (``kept`` one of them); returns those removed.

    ``same_source``: a regex the whole name of each such copy matches. Only entries directly in
    that folder are considered, so nothing outside the cache is touched; a name that does not
    match (another source, a ``.partial`` folder or ``.tmp-`` file another process is still
    writing) is left alone."""
    copies = []
    for entry in kept.parent.iterdir():
        if entry != kept and re.fullmatch(same_source, entry.name):
            try:
                copies.append((entry.lstat().st_mtime_ns, entry))
            except FileNotFoundError:   # removed by another process meanwhile
                continue
    stale = [entry for _, entry in sorted(copies, reverse=True)[max(keep - 1, 0):]]
    for entry in stale:
        _remove(entry)
    return stale


def _remove(entry: Path) -> None:
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:   # another process evicted it first
        pass
    except OSError as err:
        print(f"warning: cannot remove the stale cache entry {entry} ({err})", file=sys.stderr)


def cache_limit_bytes() -> int:
    """The size bound of the embedding cache, bytes (``R2RAY_EMBEDDING_CACHE_MAX_GB``, GB)."""
    from r2ray.errors import R2RayError

    value = os.environ.get(LIMIT_VARIABLE, "").strip()
    try:
        gigabytes = float(value) if value else DEFAULT_LIMIT_GB
    except ValueError:
        gigabytes = math.nan
    if not 0 <= gigabytes < math.inf:   # NaN too
        raise R2RayError(f"{LIMIT_VARIABLE}={value!r}: give a finite number of GB of at least 0 "
                         f"(default {DEFAULT_LIMIT_GB:g}), or turn the cache off with "
                         f"{CACHE_VARIABLE}=off")
    return int(gigabytes * 1e9)


SHARD_NAME = r"[0-9a-f]{32}\.parquet"
"""The name of every shard :func:`write_shard` writes (a uuid4's hex): the only files that
:func:`evict_over_limit` removes."""


def evict_over_limit(root: Path, limit_bytes: int, kept: Path | None) -> list[Path]:
    """Remove the least recently used shards under the cache ``root`` (every encoder's folder)
    until the rest fit in ``limit_bytes``; ``kept``, the shard just written (None: none), always
    stays.
    Returns those removed. Only shards one folder down named as :func:`write_shard` names them
    (:data:`SHARD_NAME`) are considered, so a shard another process is still writing (``.tmp``)
    and anything else (a bench's own Parquet, should the cache be pointed at a data folder) is
    left alone."""
    shards = []
    for shard in root.glob("*/*.parquet"):
        if not re.fullmatch(SHARD_NAME, shard.name):
            continue
        try:
            stat = shard.stat()
        except FileNotFoundError:   # evicted by another process meanwhile
            continue
        shards.append((stat.st_mtime_ns, stat.st_size, shard))
    total, removed = sum(size for _, size, _ in shards), []
    for _, size, shard in sorted(shards):
        if total <= limit_bytes:
            break
        if shard != kept:
            _remove(shard)
            total -= size
            removed.append(shard)
    return removed


@functools.lru_cache(maxsize=8)
def evict_over_limit_once(root: Path, limit_bytes: int) -> None:
    """:func:`evict_over_limit` once per process and bound, for a cache read without a write: a
    bound lowered since the last write (hits write nothing) is met by the next process that only
    reads, not only by the next encode. One listing of the shards per process, not per read."""
    evict_over_limit(root, limit_bytes, kept=None)


def text_keys(texts: list[str]) -> list[bytes]:
    return [hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest() for text in texts]


def read_cached(folder: Path, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
    """The vectors of ``wanted`` keys found in the folder's shards."""
    found: dict[bytes, np.ndarray] = {}
    value_set = pa.array(list(wanted), pa.binary(32))
    for shard in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        try:
            table = pq.read_table(shard, page_checksum_verification=True)
            table = table.filter(pc.is_in(table.column("text_sha256"), value_set=value_set))
            keys = table.column("text_sha256").to_pylist()
            vectors = table.column("embedding").to_numpy(zero_copy_only=False)
        except FileNotFoundError:   # evicted by another process since the listing: not a fault
            continue
        except Exception as err:  # noqa: BLE001 — a bad shard costs a re-encode, never a run
            print(f"warning: embedding cache shard {shard} is unreadable ({type(err).__name__}: "
                  f"{err}); those texts are encoded again", file=sys.stderr)
            continue
        found.update(zip(keys, vectors))   # only the wanted rows are turned into vectors
        if keys:
            touch(shard)   # used now: the last to go when the cache is over its bound
    return found


def write_shard(folder: Path, keys: list[bytes], vectors: np.ndarray) -> Path:
    """A new shard, written whole through :func:`r2ray.storage.write_bytes` (a temporary name
    renamed into place, removed should the write fail: a full disk leaves no half shard)."""
    from r2ray import storage

    table = pa.table({"text_sha256": pa.array(keys, pa.binary(32)),
                      "embedding": pa.array(list(vectors.astype(np.float32)),
                                            pa.list_(pa.float32()))})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, write_page_checksum=True)   # read_cached verifies them
    shard = folder / f"{uuid.uuid4().hex}.parquet"
    storage.write_bytes(str(shard), buffer.getvalue().to_pybytes())
    return shard


def cached_encode(texts: list[str], fingerprint: str,
                  encode: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, int]:
    """([N, D] float32 embeddings of ``texts``, how many came from the cache).

    ``fingerprint`` names the encoder (:func:`r2ray.encoders.encoder_fingerprint`);
    ``encode`` embeds the texts the cache lacks, each distinct text once."""
    root = cache_root()
    if root is None or not texts:
        return encode(texts), 0
    limit_bytes = cache_limit_bytes()   # a bad bound is an error before the encode, not after
    folder = root / fingerprint
    keys = text_keys(texts)
    found = read_cached(folder, set(keys))
    missing = list(dict.fromkeys(k for k in keys if k not in found))   # distinct, in order
    if missing:
        text_of = dict(zip(keys, texts))   # one text per key: equal keys, equal texts
        vectors = encode([text_of[k] for k in missing])
        found.update(zip(missing, vectors))
        try:
            evict_over_limit(root, limit_bytes, write_shard(folder, missing, vectors))
        except OSError as err:   # a read-only or full disk: the run goes on, uncached
            print(f"warning: cannot write the embedding cache under {folder} ({err})",
                  file=sys.stderr)
    else:   # every text a hit (just touched: the last to go)
        evict_over_limit_once(root, limit_bytes)
    encoded = set(missing)
    hits = sum(1 for k in keys if k not in encoded)
    return np.stack([found[k] for k in keys]).astype(np.float32), hits


EMBED_CHUNK_QUERIES = 2048
"""Texts per progress line of :func:`embed_texts`."""


def embed_texts(encoder, texts: list[str]) -> np.ndarray:
    """[N, D] float32: ``encoder`` (:class:`r2ray.encoders.Encoder`) on ``texts`` through the cache,
    with a line on stderr per chunk encoded (count, rate), so a long encode is never silent."""
    from r2ray.encoders import check_texts, encoder_fingerprint

    texts = check_texts(texts)   # a clear error naming the row, before any text is hashed

    def encode(missing: list[str]) -> np.ndarray:
        started, parts = time.perf_counter(), []
        for start in range(0, len(missing), EMBED_CHUNK_QUERIES):
            parts.append(encoder.encode(missing[start:start + EMBED_CHUNK_QUERIES]))
            done, seconds = min(start + EMBED_CHUNK_QUERIES, len(missing)), time.perf_counter() - started
            print(f"embedding with {encoder.name} on {encoder.device}: {done:,}/{len(missing):,} "
                  f"queries in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} queries/s)",
                  file=sys.stderr, flush=True)
        return np.concatenate(parts) if parts else encoder.encode([])

    if cache_root() is None:
        return encode(texts)
    key = encoder_key(encoder_fingerprint(encoder.name), encoder.precision)
    vectors, hits = cached_encode(texts, key, encode)
    if hits:
        print(f"embedding cache: {hits:,} of {len(texts):,} queries already embedded with "
              f"{encoder.name} ({cache_root() / key})", file=sys.stderr, flush=True)
    return vectors


def encoder_key(fingerprint: str, precision: str) -> str:
    """The cache folder name of an encoder: its fingerprint, with the forward pass's precision
    appended when it is not ``float32``: a bfloat16 pass's vectors differ from float32's (up to
    ~2e-3 a component for MiniLM), so training must never read them as float32's."""
    return fingerprint if precision == "float32" else f"{fingerprint}-{precision}"
