"""The synthetic world as data: seeded, streamed chunks of queries, bench rows, backlog and truth.

Query ``i`` of world ``seed`` depends only on (seed, i): randomness is drawn per fixed block of
:data:`BLOCK_QUERIES` queries from ``numpy.random.default_rng([seed, stream, block])``, so any chunk
size gives the same rows and the same seed gives byte-identical files. Model traits depend only on
the model names (:mod:`r2ray.bench.world`), so every seed is a fresh sample of one fixed world: train
on seed 0, route seed 1.

The ``embedding`` column is **not** from a sentence encoder: it is the hidden query features through
a fixed random projection plus noise, L2-normalised (384 floats, like all-MiniLM-L6-v2), so that a
predictor trained on it can learn the world without running an encoder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import cached_property

import numpy as np
import pyarrow as pa

from r2ray.bench.io import TableWriter, check_apart, check_output_name
from r2ray.bench.schema import BENCH_SCHEMA
from r2ray.bench.world import (KNOBS, TOPIC_NAMES, TOPICS, Knobs, QueryFeatures, answer_setting,
                               expected_outcomes, model_traits, realise, sample_features)
from r2ray.bench.world_text import render_queries
from r2ray.catalog import Catalog, save_catalog
from r2ray.errors import R2RayError
from r2ray.prompting import estimate_tokens
from r2ray.routing import call_cost_usd

WORLD_VERSION = 4             # 2: default arms capped at the output cap, not the context;
                              # 3: input tokens estimated from UTF-8 bytes (a "·" is 2);
                              # 4: caps leave the length instruction its room in the window
BLOCK_QUERIES = 1024          # unit of randomness; chunks are cut from whole blocks
EMBEDDING_DIM = 384
EMBEDDING_NOISE = 0.05       # per dimension, against a signal of norm ~1.5
EMBEDDING_READ_NOISE = (0.12, 0.6, 0.8)  # sd of the error reading difficulty, detail, latent z
_PROJECTION_SEED = 20260384   # fixed: the same projection in every world
_FEATURES, _TEXT, _OUTCOMES, _EMBEDDING = range(4)  # random streams per block

_BINARY_TOPIC = np.array([t.judged == "binary" for t in TOPICS])  # [T] labels are 0/1
SYNTH_BENCH_SCHEMA = pa.schema([f for f in BENCH_SCHEMA if f.name != "response"])
EMBEDDING_TYPE = pa.list_(pa.float32(), EMBEDDING_DIM)


class WorldError(R2RayError, ValueError):
    """Bad arguments for the synthetic world."""


def query_id(seed: int, index: int) -> str:
    return f"q{seed}-{index:09d}"


def backlog_schema(embeddings: bool) -> pa.Schema:
    fields = [pa.field("query_id", pa.string(), nullable=False), pa.field("query", pa.string()),
              pa.field("input_tokens", pa.int64())]
    return pa.schema(fields + ([pa.field("embedding", EMBEDDING_TYPE)] if embeddings else []))


def truth_schema(catalog: Catalog) -> pa.Schema:
    """One row per query; per-arm lists in ``catalog.arms`` order, pinned by the metadata."""
    per_arm = pa.list_(pa.float32(), catalog.n_arms)
    return pa.schema(
        [pa.field("query_id", pa.string(), nullable=False),
         pa.field("expected_quality", per_arm), pa.field("expected_output_tokens", per_arm)],
        metadata={"r2ray.catalog_fingerprint": catalog.fingerprint,
                  "r2ray.arms": json.dumps([[a.model, a.budget_tokens] for a in catalog.arms])})


class World:
    """A seeded synthetic world over a catalogue. Cheap to build; chunks are computed on demand."""

    def __init__(self, catalog: Catalog, seed: int = 0, knobs: Knobs = KNOBS):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise WorldError(f"seed must be a non-negative integer, got {seed!r}")
        self.catalog, self.seed, self.knobs = catalog, int(seed), knobs
        self.traits = model_traits(catalog, knobs)
        arrays = catalog.arm_arrays
        self.arm_model = arrays["model_index"].astype(np.int64)
        self.arm_budget = arrays["budget_tokens"].astype(np.int64)

    def metadata(self) -> dict[str, str]:
        return {"r2ray.world": json.dumps({"version": WORLD_VERSION, "seed": self.seed,
                                           "catalog_fingerprint": self.catalog.fingerprint})}

    def chunk(self, start: int, stop: int, *, embeddings: bool = False) -> WorldChunk:
        """Queries ``start .. stop-1`` (hidden features, text, optional embeddings)."""
        if not 0 <= start <= stop:
            raise WorldError(f"bad query range [{start}, {stop})")
        return WorldChunk(self, start, stop, embeddings)

    def iter_chunks(self, n_queries: int, chunk_queries: int = 4 * BLOCK_QUERIES, *,
                    embeddings: bool = False) -> Iterator[WorldChunk]:
        """Chunks covering queries ``0 .. n_queries-1``; only one chunk is held at a time."""
        if chunk_queries < 1:
            raise WorldError(f"chunk_queries must be at least 1, got {chunk_queries}")
        for start in range(0, n_queries, chunk_queries):
            yield self.chunk(start, min(start + chunk_queries, n_queries), embeddings=embeddings)

    def rng(self, stream: int, block: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, block])


class WorldChunk:
    """Queries ``start .. stop-1`` of a world: columns, truth and one realised bench outcome."""

    def __init__(self, world: World, start: int, stop: int, embeddings: bool):
        self.world, self.start, self.stop = world, start, stop
        self._blocks = range(start // BLOCK_QUERIES, -(-stop // BLOCK_QUERIES))
        self._offset = start - self._blocks.start * BLOCK_QUERIES  # of start inside covering blocks
        self._covering = [sample_features(world.rng(_FEATURES, b), BLOCK_QUERIES, world.knobs)
                          for b in self._blocks]
        texts = [t for b, f in zip(self._blocks, self._covering)
                 for t in render_queries(world.rng(_TEXT, b), f)]
        self._covering_tokens = np.array([estimate_tokens(t) for t in texts], dtype=np.int64)
        self.features = _slice_features(_concat_features(self._covering), self._slice)
        self.query: list[str] = texts[self._slice]
        self.query_id = [query_id(world.seed, i) for i in range(start, stop)]
        self.category = [TOPIC_NAMES[t] for t in self.features.topic]
        self.input_tokens = self._covering_tokens[self._slice]
        self.embedding = self._embeddings() if embeddings else None

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def _slice(self) -> slice:
        return slice(self._offset, self._offset + self.n)

    def _setting(self, features: QueryFeatures, input_tokens: np.ndarray):
        w = self.world
        return answer_setting(features, input_tokens, w.traits, w.arm_model, w.arm_budget, w.knobs)

    @cached_property
    def truth(self) -> tuple[np.ndarray, np.ndarray]:
        """(expected_quality, expected_output_tokens), each [n, K] in ``catalog.arms`` order."""
        return expected_outcomes(self._setting(self.features, self.input_tokens), self.world.knobs)

    @property
    def expected_quality(self) -> np.ndarray:
        return self.truth[0]

    @property
    def expected_output_tokens(self) -> np.ndarray:
        return self.truth[1]

    @cached_property
    def outcomes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One judged answer per (query, arm): (output_tokens int64, quality label, truncated), [n, K].

        Drawn per whole block (so a chunk cut inside a block sees the same draws) and sliced."""
        w, parts = self.world, []
        for i, (b, features) in enumerate(zip(self._blocks, self._covering)):
            tokens_in = self._covering_tokens[i * BLOCK_QUERIES:(i + 1) * BLOCK_QUERIES]
            binary = _BINARY_TOPIC[features.topic]
            parts.append(realise(self._setting(features, tokens_in), binary, w.rng(_OUTCOMES, b),
                                 len(w.catalog.models), w.knobs))
        return tuple(np.concatenate([p[j] for p in parts])[self._slice] for j in range(3))

    def _embeddings(self) -> np.ndarray:
        width = EMBEDDING_DIM + 2 + self.world.knobs.latent_dims
        noise = np.concatenate([self.world.rng(_EMBEDDING, b).standard_normal((BLOCK_QUERIES, width))
                                for b in self._blocks])[self._slice]
        return synthetic_embeddings(self.features, noise)

    # ---- Arrow -------------------------------------------------------------------------------
    def bench_table(self) -> pa.Table:
        """Long format, every arm of every query (SYNTH_BENCH_SCHEMA, ``cost_usd`` realised)."""
        catalog, k = self.world.catalog, self.world.catalog.n_arms
        tokens, label, truncated = self.outcomes
        row_query = np.repeat(np.arange(self.n), k)
        row_arm = np.tile(np.arange(k), self.n)
        cost = call_cost_usd(catalog, self.input_tokens, tokens)   # the prompt sent: + instruction
        take = lambda values: pa.array(values, pa.string()).take(row_query)  # noqa: E731
        return pa.table({
            "query_id": take(self.query_id), "query": take(self.query), "category": take(self.category),
            "model": pa.array(catalog.model_names).take(self.world.arm_model[row_arm]),
            "budget": pa.array(self.world.arm_budget[row_arm], pa.int32()),
            "input_tokens": pa.array(self.input_tokens[row_query]),
            "output_tokens": pa.array(tokens.ravel()), "quality": pa.array(label.ravel()),
            "truncated": pa.array(truncated.ravel()), "cost_usd": pa.array(cost.ravel()),
        }, schema=SYNTH_BENCH_SCHEMA)

    def backlog_table(self) -> pa.Table:
        columns = {"query_id": self.query_id, "query": self.query, "input_tokens": self.input_tokens}
        if self.embedding is not None:
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(self.embedding.ravel()), EMBEDDING_DIM)
        return pa.table(columns, schema=backlog_schema(self.embedding is not None))

    def truth_table(self) -> pa.Table:
        schema = truth_schema(self.world.catalog)
        k = self.world.catalog.n_arms
        per_arm = lambda a: pa.FixedSizeListArray.from_arrays(  # noqa: E731
            pa.array(a.astype(np.float32).ravel()), k)
        return pa.table([pa.array(self.query_id), per_arm(self.expected_quality),
                         per_arm(self.expected_output_tokens)], schema=schema)


def _concat_features(parts: list[QueryFeatures]) -> QueryFeatures:
    return QueryFeatures(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in QueryFeatures.__dataclass_fields__))


def _slice_features(features: QueryFeatures, rows: slice) -> QueryFeatures:
    return QueryFeatures(*(getattr(features, f)[rows] for f in QueryFeatures.__dataclass_fields__))


def synthetic_embeddings(features: QueryFeatures, noise: np.ndarray) -> np.ndarray:
    """[n, 384] float32, L2-normalised. An encoder reads the hidden features with error (topic
    exactly; difficulty, answer detail and the latent z through ``EMBEDDING_READ_NOISE``); the
    reading goes through a fixed random projection, plus a common direction (unrelated queries
    still have positive cosine) plus a little per-dimension noise. ``noise``: [n, 384 + 2 + z dims]
    standard normal."""
    read = noise[:, EMBEDDING_DIM:]
    difficulty_sd, detail_sd, latent_sd = EMBEDDING_READ_NOISE
    signal = np.concatenate([
        np.eye(len(TOPICS))[features.topic],
        (features.difficulty - 0.2 + difficulty_sd * read[:, 0])[:, None] / 0.2 * 0.6,
        (features.detail + detail_sd * read[:, 1])[:, None] * 0.4,
        (features.latent + latent_sd * read[:, 2:]) * 0.5,
    ], axis=1)
    rng = np.random.default_rng(_PROJECTION_SEED)
    projection = rng.standard_normal((signal.shape[1], EMBEDDING_DIM)) / math.sqrt(EMBEDDING_DIM)
    common = rng.standard_normal(EMBEDDING_DIM) / math.sqrt(EMBEDDING_DIM)
    vectors = signal @ projection + common[None, :] + EMBEDDING_NOISE * noise[:, :EMBEDDING_DIM]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


# ---- whole tables and files ------------------------------------------------------------------
def synth_bench(catalog: Catalog, n_queries: int, seed: int = 0) -> pa.Table:
    """The bench of the first ``n_queries`` queries of world ``seed``, in memory (small n only)."""
    world = World(catalog, seed)
    return pa.concat_tables([c.bench_table() for c in world.iter_chunks(n_queries)])


def synth_backlog(catalog: Catalog, n_queries: int, seed: int = 0, embeddings: bool = False) -> pa.Table:
    """The same queries as :func:`synth_bench` of the same (seed, n), without outcomes."""
    world = World(catalog, seed)
    return pa.concat_tables([c.backlog_table() for c in world.iter_chunks(n_queries, embeddings=embeddings)])


def synth_truth(catalog: Catalog, n_queries: int, seed: int = 0) -> pa.Table:
    world = World(catalog, seed)
    return pa.concat_tables([c.truth_table() for c in world.iter_chunks(n_queries)])


def write_world(catalog: Catalog, *, n_queries: int, seed: int, bench_uri: str | None = None,
                backlog_uri: str | None = None, truth_uri: str | None = None,
                embeddings: bool = False, chunk_queries: int = 4096) -> str:
    """Stream the world to files (parquet or jsonl by suffix); returns a human summary.

    ``chunk_queries`` bounds memory only (rounded up to whole blocks of 1,024 queries); the
    content never depends on it. The bench gets its catalogue beside it
    (``<bench without suffix>.catalog.yaml``), so ``r2ray bench stats`` prices it right.
    """
    _check_write_args(n_queries, chunk_queries, bench_uri, backlog_uri, truth_uri, embeddings)
    from r2ray.bench.stats import catalog_uri_beside

    started = time.perf_counter()
    world = World(catalog, seed)
    metadata = world.metadata()
    chunk_queries = -(-chunk_queries // BLOCK_QUERIES) * BLOCK_QUERIES
    with ExitStack() as stack:
        open_writer = lambda uri, schema: stack.enter_context(  # noqa: E731
            TableWriter(uri, schema.with_metadata({**(schema.metadata or {}), **metadata})))
        outputs = {
            "bench": (bench_uri, lambda c: c.bench_table(), SYNTH_BENCH_SCHEMA),
            "backlog": (backlog_uri, lambda c: c.backlog_table(), backlog_schema(embeddings)),
            "truth": (truth_uri, lambda c: c.truth_table(), truth_schema(catalog)),
        }
        writers = {name: (open_writer(uri, schema), table)
                   for name, (uri, table, schema) in outputs.items() if uri}
        for chunk in world.iter_chunks(n_queries, chunk_queries, embeddings=embeddings):
            for writer, table in writers.values():
                writer.write(table(chunk))
        rows = {name: writer.rows for name, (writer, _) in writers.items()}
    if bench_uri:
        save_catalog(catalog, catalog_uri_beside(bench_uri))
    seconds = time.perf_counter() - started
    lines = [f"synthetic world seed {seed}: {n_queries:,} queries × {catalog.n_arms} arms "
             f"(catalogue {catalog.fingerprint[:12]})"]
    for name, uri in (("bench", bench_uri), ("backlog", backlog_uri), ("truth", truth_uri)):
        if uri:
            extra = f" (catalogue: {catalog_uri_beside(uri)})" if name == "bench" else ""
            lines.append(f"  {name:<8}{rows[name]:>14,} rows → {uri}{extra}")
    lines.append(f"  in {seconds:.1f} s ({n_queries / max(seconds, 1e-9):,.0f} queries/s)")
    return "\n".join(lines)


def _check_write_args(n_queries, chunk_queries, bench_uri, backlog_uri, truth_uri, embeddings) -> None:
    if isinstance(n_queries, bool) or not isinstance(n_queries, (int, np.integer)) or n_queries < 1:
        raise WorldError(f"--queries must be a positive integer, got {n_queries!r}")
    if chunk_queries < 1:
        raise WorldError(f"--chunk-queries must be at least 1, got {chunk_queries}")
    if not (bench_uri or backlog_uri or truth_uri):
        raise WorldError("nothing to write: give at least one of --out, --backlog, --truth")
    if embeddings and not backlog_uri:
        raise WorldError("--embeddings adds a column to the backlog: give --backlog PATH too")
    outputs = [(option, uri) for option, uri in (("--out", bench_uri), ("--backlog", backlog_uri),
                                                 ("--truth", truth_uri)) if uri]
    for option, uri in outputs:
        check_output_name(uri, option)
    check_apart(outputs)
