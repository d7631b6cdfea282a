"""The long bench format: one row per (query, arm) with the judged outcome.

Columns (DESIGN.md, "Bench"): ``query_id, query, category, model, budget, input_tokens,
output_tokens, quality, truncated`` plus optional ``response`` and ``cost_usd`` (USD, realised,
where the source recorded it). ``budget`` is in output tokens, 0 meaning the model's default.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray.catalog import Catalog, CatalogError
from r2ray.errors import R2RayError

BENCH_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("budget", pa.int32(), nullable=False),
    pa.field("input_tokens", pa.int64(), nullable=False),
    pa.field("output_tokens", pa.int64(), nullable=False),
    pa.field("quality", pa.float64(), nullable=False),
    pa.field("truncated", pa.bool_()),
    pa.field("response", pa.string()),
    pa.field("cost_usd", pa.float64()),
])
REQUIRED_COLUMNS = [f.name for f in BENCH_SCHEMA if not f.nullable] + ["category", "truncated"]
OPTIONAL_COLUMNS = ["response", "cost_usd"]


class BenchError(R2RayError, ValueError):
    """Bad bench data. The message names the file, the row (1-based data row) and the field.

    ``row`` (0-based), ``field`` and ``detail`` (the message without the location) are kept
    when known, so an adapter can re-point an error at the source line a bench row came from.
    """

    row: int | None = None
    field: str | None = None
    detail: str | None = None
    source: str | None = None


def bench_error(source: str, row: int | None, field: str | None, message: str) -> BenchError:
    where = [source]
    if row is not None:
        where.append(f"row {row + 1}")
    if field is not None:
        where.append(f"field {field!r}")
    error = BenchError(": ".join([", ".join(where), message]))
    error.row, error.field, error.detail, error.source = row, field, message, source
    return error


def at_source_row(err: BenchError, source: str, source_rows) -> BenchError:
    """``err``, about a row of a bench table, re-pointed at ``source_rows`` [rows] (1-based) of
    that table: the source row (a jsonl line, a CSV record) each bench row came from."""
    return bench_error(source, int(source_rows[err.row]) - 1, err.field, err.detail or str(err))


def conform(table: pa.Table, source: str) -> pa.Table:
    """Cast to BENCH_SCHEMA (optional columns kept only if present). Missing columns are errors."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise bench_error(source, None, missing[0],
                          f"missing column(s) {missing}; the bench needs {REQUIRED_COLUMNS}")
    fields = [f for f in BENCH_SCHEMA if f.name in REQUIRED_COLUMNS or f.name in table.column_names]
    columns = []
    for f in fields:
        column = table.column(f.name)
        try:
            columns.append(column.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            row = _first_uncastable(column, f.type)
            raise bench_error(source, row, f.name, f"cannot read as {f.type}: {err}") from None
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _first_uncastable(column: pa.ChunkedArray, type_: pa.DataType) -> int | None:
    """The first row whose value alone fails the cast, tried in the column's own type: through
    Python, a uint64 past int64's range raised an OverflowError, not the row's BenchError."""
    for i in range(len(column)):
        try:
            column.slice(i, 1).cast(type_)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return None


def _first(mask: pa.ChunkedArray | np.ndarray) -> int | None:
    hits = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(hits[0]) if hits.size else None


def validate_bench(table: pa.Table, source: str, catalog: Catalog | None = None,
                   row_offset: int = 0) -> pa.Table:
    """Conform and check a bench table; raise :class:`BenchError` at the first bad row.

    ``row_offset`` is added to row numbers when ``table`` is one chunk of a larger file.
    Checks: required columns, no nulls in required fields, quality in [0, 1], non-negative
    tokens, non-negative budget, unique (query_id, model, budget), models and their budgets
    (arms) known to ``catalog``.
    """
    table = conform(table, source)

    def fail(mask, field, message):
        row = _first(mask)
        if row is not None:
            raise bench_error(source, row + row_offset, field, message(row))

    for name in REQUIRED_COLUMNS:
        if name in ("category", "truncated"):
            continue
        fail(table.column(name).is_null().to_numpy(zero_copy_only=False), name,
             lambda r: "is empty (null)")
    quality = table.column("quality").to_numpy()
    fail(~((quality >= 0.0) & (quality <= 1.0)), "quality",
         lambda r: f"quality {float(quality[r])!r} is outside [0, 1]")
    for name in ("input_tokens", "output_tokens", "budget"):
        values = table.column(name).to_numpy()
        fail(values < 0, name, lambda r, v=values, n=name: f"{n} {v[r]} is negative")
    if "cost_usd" in table.column_names:
        cost = table.column("cost_usd").to_numpy(zero_copy_only=False)
        fail(np.nan_to_num(cost, nan=0.0) < 0, "cost_usd", lambda r: f"cost_usd {cost[r]} < 0")
        fail(np.isinf(cost), "cost_usd",   # NaN stays "not recorded", as a null
             lambda r: f"cost_usd {cost[r]} is not a finite number of USD")
    if catalog is not None:
        known = pa.array(catalog.model_names)
        unknown = pc.invert(pc.is_in(table.column("model"), value_set=known))
        models = table.column("model")
        fail(unknown.to_numpy(zero_copy_only=False), "model",
             lambda r: f"unknown model {models[r].as_py()!r}; the catalogue has: "
                       f"{', '.join(catalog.model_names)}")
        fail(~_known_arms(table, catalog), "budget",
             lambda r: _arm_refusal(catalog, models[r].as_py(), table.column("budget")[r].as_py()))
    check_unique(table, source, row_offset)
    return table


def _known_arms(table: pa.Table, catalog: Catalog) -> np.ndarray:
    """[rows] bool: the row's (model, budget) is an arm of ``catalog``."""
    return arm_indices(table, catalog) >= 0


def arm_indices(table: pa.Table, catalog: Catalog) -> np.ndarray:
    """[rows] int64: each row's arm, its index in ``catalog.arms``, or -1 where its (model,
    budget) is no arm of ``catalog`` (an unknown model too). One int64 key per arm, model
    position × 2³² + budget (budgets non-negative int32)."""
    def keys(models, budgets) -> np.ndarray:
        position = pc.index_in(models, value_set=pa.array(catalog.model_names)).fill_null(-1)
        return (position.to_numpy(zero_copy_only=False).astype(np.int64) << 32) \
            + np.asarray(budgets, np.int64)
    arms = catalog.arms
    known = keys(pa.array([a.model for a in arms]), [a.budget_tokens for a in arms])
    rows = keys(table.column("model"), table.column("budget").to_numpy())
    order = np.argsort(known)
    at = np.minimum(np.searchsorted(known, rows, sorter=order), len(known) - 1)
    return np.where(known[order][at] == rows, order[at], -1)


def _arm_refusal(catalog: Catalog, model: str, budget: int) -> str:
    """The catalogue's own words for an arm it lacks (which budgets the model offers)."""
    try:
        catalog.arm_of(model, budget)
    except CatalogError as err:
        return str(err)
    return f"({model!r}, {budget}) is not an arm of the catalogue"


def check_unique(table: pa.Table, source: str, row_offset: int = 0) -> None:
    """Each (query_id, model, budget) once; else an error at the first row that repeats one."""
    keys = table.select(["query_id", "model", "budget"]).append_column(
        "_row", pa.array(np.arange(table.num_rows)))
    counts = keys.group_by(["query_id", "model", "budget"]).aggregate(
        [("_row", "count"), ("_row", "max")])
    dup = pc.greater(counts.column("_row_count"), 1)
    if pc.any(dup).as_py():
        first = counts.filter(dup).sort_by("_row_max").slice(0, 1).to_pylist()[0]
        raise bench_error(
            source, first["_row_max"] + row_offset, "query_id",
            f"duplicate (query_id, model, budget) = ({first['query_id']!r}, {first['model']!r}, "
            f"{first['budget']}); each query answers each arm once")


def row_keys(table: pa.Table, file_index: int, offset: int = 0) -> pa.Table:
    """The arm key of each row, with its file (index into the file list) and 0-based row there."""
    return table.select(["query_id", "model", "budget"]).append_column(
        "_file", pa.array(np.full(table.num_rows, file_index, np.int32))).append_column(
        "_row", pa.array(np.arange(offset, offset + table.num_rows, dtype=np.int64)))


def check_unique_across(keys: list[pa.Table], files: list[str]) -> None:
    """:func:`check_unique` over the :func:`row_keys` of several files or batches, each already
    checked alone; its error names the file and row (0-based there) of the first row that
    repeats an earlier one, not a row of their concatenation, which no file has."""
    if len(keys) < 2:
        return
    table = pa.concat_tables(keys)
    try:
        check_unique(table, "bench (all files)")
    except BenchError as err:
        file, row = table.column("_file")[err.row].as_py(), table.column("_row")[err.row].as_py()
        raise bench_error(files[file], row, err.field, err.detail) from None
