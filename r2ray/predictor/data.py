"""Bench (long format) → dense per-query arrays over the catalogue's arms.

Every predictor, baseline and evaluation works on :class:`BenchArrays`: one row per query, one
column per arm in ``catalog.arms`` order, NaN where the bench has no outcome for that arm.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray.bench.schema import BenchError, bench_error
from r2ray.catalog import Catalog
from r2ray.routing import call_cost_usd


@dataclass(frozen=True)
class BenchArrays:
    query_id: np.ndarray       # [N] str
    query: np.ndarray          # [N] str
    category: np.ndarray       # [N] str ('' when the bench has none)
    input_tokens: np.ndarray   # [N] float64, tokens
    quality: np.ndarray        # [N, K] float32 in [0, 1], NaN = arm not in the bench
    output_tokens: np.ndarray  # [N, K] float32, tokens, NaN = missing
    cost_usd: np.ndarray       # [N, K] float64 realised USD: bench cost_usd, else call_cost_usd
    embedding: np.ndarray | None = None  # [N, D] float32, when known

    @property
    def n_queries(self) -> int:
        return len(self.query_id)

    @property
    def mask(self) -> np.ndarray:
        """[N, K] bool: the bench has an outcome for this (query, arm)."""
        return ~np.isnan(self.quality)

    def subset(self, index: np.ndarray) -> BenchArrays:
        return replace(self, **{f.name: getattr(self, f.name)[index]
                                for f in fields(self) if getattr(self, f.name) is not None})

    def unobserved_models(self, catalog: Catalog) -> list[str]:
        """Models of ``catalog`` (whose arms are the columns) with no outcome in these rows."""
        observed = self.mask.any(axis=0)
        model = catalog.arm_arrays["model_index"]
        return [name for m, name in enumerate(catalog.model_names)
                if not observed[model == m].any()]

    def with_embedding(self, embedding: np.ndarray) -> BenchArrays:
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.shape[0] != self.n_queries:
            raise ValueError(f"{embedding.shape[0]} embeddings for {self.n_queries} queries")
        return replace(self, embedding=embedding)


def arm_positions(catalog: Catalog, models: pa.ChunkedArray | pa.Array,
                  budgets: np.ndarray, source: str = "bench") -> np.ndarray:
    """Arm index [R] for each (model, budget) row; an arm outside the catalogue is a BenchError."""
    encoded = pc.dictionary_encode(models).combine_chunks() if isinstance(
        models, pa.ChunkedArray) else pc.dictionary_encode(models)
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    arms = np.full(len(codes), -1, dtype=np.int64)
    for code, name in enumerate(names):
        rows = np.flatnonzero(codes == code)
        for budget in np.unique(budgets[rows]):
            sel = rows[budgets[rows] == budget]
            try:
                arms[sel] = catalog.arm_of(name, int(budget))
            except ValueError as err:
                raise BenchError(f"{source}, row {sel[0] + 1}, field 'budget': {err}") from None
    return arms


def bench_arrays(table: pa.Table, catalog: Catalog, queries: pa.Table | None = None,
                 source: str = "bench") -> BenchArrays:
    """Pivot a validated long bench into :class:`BenchArrays` (queries in first-seen order).

    ``queries`` may carry ``query_id`` + ``embedding`` (e.g. a synthetic backlog); every bench
    query must then have an embedding, else a BenchError names the first one missing.
    """
    ids, inverse = _first_seen_codes(table.column("query_id"))
    n, k = len(ids), catalog.n_arms
    arm = arm_positions(catalog, table.column("model"), table.column("budget").to_numpy(), source)
    first_row = _first_rows(inverse, n)
    check_one_text_per_query(table, first_row[inverse], source)

    def dense(values: np.ndarray, dtype) -> np.ndarray:
        out = np.full((n, k), np.nan, dtype=dtype)
        out[inverse, arm] = values
        return out

    quality = dense(table.column("quality").to_numpy(), np.float32)
    output_tokens = dense(table.column("output_tokens").to_numpy().astype(np.float64), np.float32)
    input_rows = table.column("input_tokens").to_numpy().astype(np.float64)
    # no recorded cost: the bill of the prompt sent, instruction included, as ĉ prices it
    realised = call_cost_usd(catalog, input_rows, table.column("output_tokens").to_numpy(), arm)
    if "cost_usd" in table.column_names:
        recorded = table.column("cost_usd").to_numpy(zero_copy_only=False).astype(np.float64)
        realised = np.where(np.isnan(recorded), realised, recorded)
    category = (table.column("category").fill_null("").to_numpy(zero_copy_only=False)
                if "category" in table.column_names else np.full(table.num_rows, ""))
    arrays = BenchArrays(
        query_id=ids,
        query=table.column("query").to_numpy(zero_copy_only=False)[first_row],
        category=category[first_row].astype(str),
        input_tokens=input_rows[first_row],
        quality=quality,
        output_tokens=output_tokens,
        cost_usd=dense(realised, np.float64),
    )
    return arrays if queries is None else arrays.with_embedding(
        embeddings_for(ids, queries, source))


def check_one_text_per_query(table: pa.Table, first_rows: np.ndarray, source: str) -> None:
    """Each query_id names one query: its first row's text is the one embedded, so a row with
    another text under the same id (two sources' ids that collide) would be learned as an outcome
    on a question it never answered. ``first_rows`` [R]: each row's query's first row."""
    text = table.column("query")
    differs = pc.not_equal(text, text.take(pa.array(first_rows))).to_numpy(zero_copy_only=False)
    if differs.any():
        row = int(np.flatnonzero(differs)[0])
        query_id = table.column("query_id")[row].as_py()
        raise bench_error(source, row, "query", f"query_id {query_id!r} has another text here than "
                          f"at row {first_rows[row] + 1}; each query_id names one query: give the "
                          "other query its own id")


def embeddings_for(query_ids: np.ndarray, queries: pa.Table, source: str = "bench") -> np.ndarray:
    """[N, D] float32 embeddings looked up by query_id in a table with ``embedding``."""
    if "embedding" not in queries.column_names:
        raise BenchError(f"{source}: the queries table has no 'embedding' column")
    position = {qid: i for i, qid in enumerate(queries.column("query_id").to_pylist())}
    missing = [qid for qid in query_ids if qid not in position]
    if missing:
        raise BenchError(f"{source}: no embedding for query_id {missing[0]!r} "
                         f"({len(missing)} queries without one)")
    check_one_embedding_per_query(queries, query_ids, source)
    index = np.fromiter((position[q] for q in query_ids), dtype=np.int64, count=len(query_ids))
    return embedding_matrix(queries.column("embedding").take(pa.array(index)))


def check_one_embedding_per_query(queries: pa.Table, query_ids: np.ndarray, source: str) -> None:
    """A query_id of ``query_ids`` on two rows of ``queries`` with different embeddings (two
    backlogs whose ids collide) is an error naming it: the last row's was taken without a word,
    and the query learned or scored on another question's vector. Equal repeats (one backlog
    read twice) are harmless and pass. Each repeated row is compared with its id's first row, as
    :func:`check_one_text_per_query` compares texts."""
    ids, inverse = _first_seen_codes(queries.column("query_id"))
    if len(ids) == queries.num_rows:   # no id repeats: nothing to compare
        return
    first = _first_rows(inverse, len(ids))[inverse]
    rows = np.flatnonzero(first != np.arange(len(first)))
    rows = rows[np.isin(ids, query_ids)[inverse[rows]]]   # only ids the bench uses
    column = queries.column("embedding")
    repeat, original = (embedding_matrix(column.take(pa.array(r))) for r in (rows, first[rows]))
    same = (repeat == original) | (np.isnan(repeat) & np.isnan(original))
    differs = np.flatnonzero(~same.all(axis=1))
    if differs.size:
        code = inverse[rows[differs[0]]]
        raise BenchError(f"{source}: query_id {str(ids[code])!r} has "
                         f"{int(np.count_nonzero(inverse == code))} rows with different embeddings "
                         "in the queries table; each query_id names one query: give the other its "
                         "own id (in the bench as well)")


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list/fixed-size-list column of equal-length vectors → [N, D] float32."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        raise BenchError(f"embeddings have different lengths ({lengths.min()}..{lengths.max()})")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(column), int(lengths[0]))


def _first_rows(inverse: np.ndarray, n: int) -> np.ndarray:
    """[n] the first row of each of ``n`` codes (``inverse``: each row's code)."""
    first_row = np.full(n, -1, dtype=np.int64)
    first_row[inverse[::-1]] = np.arange(len(inverse))[::-1]
    return first_row


def _first_seen_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values in first-seen order, code per row)."""
    values = column.to_numpy(zero_copy_only=False)
    uniques, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniques[order].astype(str), rank[inverse]


SPLITS = ("random", "category")


def split_indices(arrays: BenchArrays, split: str = "random", seed: int = 0,
                  test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows). ``random``: a seeded ``test_fraction`` of queries;
    ``category``: leave one category out, the ``seed``-th of the sorted categories."""
    if split == "random":
        return holdout_indices(arrays.n_queries, test_fraction, seed)
    if split != "category":
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    uncategorised = np.flatnonzero(arrays.category == "")
    if uncategorised.size and uncategorised.size < arrays.n_queries:  # '' would be held out as one
        first = str(arrays.query_id[uncategorised[0]])
        raise BenchError(f"the category split needs a category on every query; query_id {first!r} "
                         f"has none ({uncategorised.size} queries without one); give them one or "
                         "use the random split")
    categories = np.unique(arrays.category)
    if len(categories) < 2:
        raise BenchError(f"the category split needs at least two categories; the bench has "
                         f"{categories.tolist()}; use the random split")
    held_out = categories[seed % len(categories)]
    is_test = arrays.category == held_out
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows): a seeded random ``fraction`` of ``n`` rows, at least one each."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a held-out fraction must lie in (0, 1), got {fraction}")
    if n < 2:
        raise BenchError(f"cannot split {n} queries into two parts; the bench needs at least 2")
    order = np.random.default_rng(seed).permutation(n)
    n_out = min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[n_out:]), np.sort(order[:n_out])
