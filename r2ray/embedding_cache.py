"""Embeddings once: a cache of query embeddings keyed by the encoder's fingerprint and each text's
hash, so ``r2ray train`` → ``r2ray evaluate`` → promotion encode a bench's queries one time.

Encoding is the costliest step of training on text (MiniLM: ~140 short texts/s on 2 cores, ~5/s
per core at 256 tokens), and every command used to encode the same bench again. The cache lives
in ``R2RAY_EMBEDDING_CACHE`` (a folder; ``off`` turns it off), default
``~/.cache/r2ray/embeddings``, one sub-folder per encoder fingerprint (a hash of the model
folder's files: another model, or the same name with other weights, never shares vectors). Each
encode that missed writes one Parquet shard (``text_sha256``, ``embedding``) under a unique name,
written whole and renamed, so concurrent processes never clash and a killed one leaves nothing
half-written. A shard that cannot be read is skipped with a warning: the texts are encoded again.
"""

from __future__ import annotations

import functools
import hashlib
import os
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


def cache_root(variable: str = CACHE_VARIABLE, default: Path = DEFAULT_CACHE) -> Path | None:
    """The cache folder the environment ``variable`` names (``default`` when unset), or None
    when it says ``off`` (or 0, false, no). The local LLM's converted-model cache reads its own
    variable through this too."""
    value = os.environ.get(variable, "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return Path(value or default).expanduser()


def folder_fingerprint(folder: str) -> str:
    """sha256 (hex, 16 chars) over every file of a model folder: relative path, size, contents.
    Remembered per process by :func:`files_key` (a few ms), so files changed since are hashed
    again."""
    return _content_fingerprint(folder, files_key(Path(folder), hashlib.sha256()))


def files_key(folder: Path, key) -> str:
    """``key`` (a hashlib object) updated with every file of ``folder``: its name, size and
    modification time (no contents read: a few ms); its hex digest, 16 characters."""
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        key.update(f"|{file.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _content_fingerprint(folder: str, files: str) -> str:
    """:func:`folder_fingerprint` of ``folder`` whose files have :func:`files_key` ``files``."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def text_keys(texts: list[str]) -> list[bytes]:
    return [hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest() for text in texts]


def read_cached(folder: Path, wanted: set[bytes]) -> dict[bytes, np.ndarray]:
    """The vectors of ``wanted`` keys found in the folder's shards."""
    found: dict[bytes, np.ndarray] = {}
    value_set = pa.array(list(wanted), pa.binary(32))
    for shard in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        try:
            table = pq.read_table(shard)
            table = table.filter(pc.is_in(table.column("text_sha256"), value_set=value_set))
            keys = table.column("text_sha256").to_pylist()
            vectors = table.column("embedding").to_numpy(zero_copy_only=False)
        except Exception as err:  # noqa: BLE001 — a bad shard costs a re-encode, never a run
            print(f"warning: embedding cache shard {shard} is unreadable ({type(err).__name__}: "
                  f"{err}); those texts are encoded again", file=sys.stderr)
            continue
        found.update(zip(keys, vectors))   # only the wanted rows are turned into vectors
    return found


def write_shard(folder: Path, keys: list[bytes], vectors: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text_sha256": pa.array(keys, pa.binary(32)),
                      "embedding": pa.array(list(vectors.astype(np.float32)),
                                            pa.list_(pa.float32()))})
    name = uuid.uuid4().hex
    temporary = folder / f".{name}.tmp"
    pq.write_table(table, temporary)
    temporary.rename(folder / f"{name}.parquet")


def cached_encode(texts: list[str], fingerprint: str,
                  encode: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, int]:
    """([N, D] float32 embeddings of ``texts``, how many came from the cache).

    ``fingerprint`` names the encoder (:func:`r2ray.encoders.encoder_fingerprint`);
    ``encode`` embeds the texts the cache lacks, each distinct text once."""
    root = cache_root()
    if root is None or not texts:
        return encode(texts), 0
    folder = root / fingerprint
    keys = text_keys(texts)
    found = read_cached(folder, set(keys))
    missing = list(dict.fromkeys(k for k in keys if k not in found))   # distinct, in order
    if missing:
        text_of = dict(zip(keys, texts))   # one text per key: equal keys, equal texts
        vectors = encode([text_of[k] for k in missing])
        found.update(zip(missing, vectors))
        try:
            write_shard(folder, missing, vectors)
        except OSError as err:   # a read-only or full disk: the run goes on, uncached
            print(f"warning: cannot write the embedding cache under {folder} ({err})",
                  file=sys.stderr)
    encoded = set(missing)
    hits = sum(1 for k in keys if k not in encoded)
    return np.stack([found[k] for k in keys]).astype(np.float32), hits


EMBED_CHUNK_QUERIES = 2048
"""Texts per progress line of :func:`embed_texts`."""


def embed_texts(encoder, texts: list[str]) -> np.ndarray:
    """[N, D] float32: ``encoder`` (:class:`r2ray.encoders.Encoder`) on ``texts`` through the cache,
    with a line on stderr per chunk encoded (count, rate), so a long encode is never silent."""
    from r2ray.encoders import encoder_fingerprint

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
    fingerprint = encoder_fingerprint(encoder.name)
    vectors, hits = cached_encode(texts, fingerprint, encode)
    if hits:
        print(f"embedding cache: {hits:,} of {len(texts):,} queries already embedded with "
              f"{encoder.name} ({cache_root() / fingerprint})", file=sys.stderr, flush=True)
    return vectors
