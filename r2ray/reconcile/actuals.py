"""Realised usage as the execution engine writes it: read, coerce, and mark every bad row.

One row per executed request: ``query_id, model, budget`` (output tokens, 0 or ``"default"`` for
the default arm), ``input_tokens, output_tokens`` (tokens billed), optional ``quality`` ∈ [0, 1],
``cost_usd`` (USD billed) and ``run_id`` (the run billed, as ``r2ray execute`` writes it; absent
or blank: not said, as in a provider's billing export). Parquet or jsonl, a file, a folder or a
glob, local or ``s3://``.

A missing column stops with an :class:`ActualsError` naming it and the file. A bad row is never
dropped silently and never stops the read: it is kept with its reason in ``invalid`` (null for a
good row), so the reconciliation counts it. Checks that need the catalogue or every row at once
(another run's bill, an arm outside the catalogue, a repeated key) are :func:`mark_other_runs`,
:func:`mark_unknown_arms` and :func:`mark_duplicates`.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray import storage
from r2ray.bench.io import SUFFIXES, blank_line, jsonl_lines, read_table_rows
from r2ray.bench.schema import BenchError
from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.redaction import redact_uri

REQUIRED = ["query_id", "model", "budget", "input_tokens", "output_tokens"]
OPTIONAL = ["quality", "cost_usd"]
RUN_ID = "run_id"   # optional text: the run the row was billed to
KEY = ["query_id", "model", "budget"]
DUPLICATE = "duplicate (query_id, model, budget)"
ACTUALS_SCHEMA = pa.schema([
    pa.field("query_id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),           # output tokens, 0 = default
    pa.field("input_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("quality", pa.float64()),        # null: not judged
    pa.field("cost_usd", pa.float64()),       # USD billed; null: price it from the catalogue
    pa.field("run_id", pa.string()),          # the run billed; null: not said (not checked)
    pa.field("source", pa.string()),          # file the row came from
    pa.field("row", pa.int64()),              # 1-based: data row (parquet), line (jsonl)
    pa.field("invalid", pa.string()),         # why the row cannot be used; null: good
])


class ActualsError(R2RayError, ValueError):
    """Actuals that cannot be read at all (a missing column, a column of the wrong kind)."""


def read_actuals(uri: str) -> pa.Table:
    """Every row of the actuals under ``uri`` (ACTUALS_SCHEMA), bad ones marked in ``invalid``."""
    with storage.reporting(f"cannot read the actuals {redact_uri(uri)}"):
        tables = [_read_actuals_file(path) for path in storage.list_files(uri, SUFFIXES)]
    return pa.concat_tables(tables) if tables else ACTUALS_SCHEMA.empty_table()


def _read_actuals_file(uri: str) -> pa.Table:
    table, rows = _read_file(uri)
    return actuals_from_table(table, redact_uri(uri), rows)


def _read_file(uri: str) -> tuple[pa.Table, np.ndarray]:
    """The table and [rows] where each row is (1-based data row in parquet, line in jsonl, as the
    bench readers name it): Arrow's fast reader; for a jsonl file it refuses (a line that is not
    JSON, a column that mixes numbers and text such as ``"budget": "default"``), one line at a
    time."""
    try:
        table, rows = read_table_rows(uri)
    except BenchError:
        if uri.endswith(".parquet"):
            raise
        return _lenient_jsonl(storage.read_bytes(uri))
    if not uri.endswith(".parquet") and any(   # Arrow inferred a date from text ("2024-01-01")
            pa.types.is_temporal(table.schema.field(name).type)
            for name in REQUIRED + OPTIONAL + [RUN_ID] if name in table.column_names):
        return _lenient_jsonl(storage.read_bytes(uri))
    return table, rows


def _lenient_jsonl(data: bytes) -> tuple[pa.Table, np.ndarray]:
    """Every non-blank line a row (lines split as every jsonl reader splits them: on ``\\n``
    only, a byte order mark dropped), and [rows] its line; a line that is no JSON object is
    marked ``_unparsed``; a column that mixes kinds is read as text (coercion then judges each
    value)."""
    records, unparsed, lines = [], [], []
    for number, raw in enumerate(jsonl_lines(io.BytesIO(data)), 1):
        if blank_line(raw):
            continue
        line = raw.decode("utf-8", errors="replace")
        lines.append(number)
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        unparsed.append(not isinstance(record, dict))
        records.append(record if isinstance(record, dict) else {})
    names = [name for name in REQUIRED + OPTIONAL + [RUN_ID] if any(name in r for r in records)]
    columns = {name: _loose_column([r.get(name) for r in records]) for name in names}
    table = pa.table(columns | {"_unparsed": pa.array(unparsed, pa.bool_())})
    return table, np.asarray(lines, np.int64)


def _loose_column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def actuals_from_table(table: pa.Table, source: str, rows: np.ndarray | None = None) -> pa.Table:
    """One file's rows coerced to ACTUALS_SCHEMA; the first problem of each row in ``invalid``.
    ``rows`` [R]: where each row is in its file, 1-based (None: its position in ``table``)."""
    if table.num_rows == 0:
        return ACTUALS_SCHEMA.empty_table()
    missing = [name for name in REQUIRED if name not in table.column_names]
    if missing:
        raise ActualsError(f"actuals {source}: missing column(s) {missing}; actuals need "
                           f"{REQUIRED} (optional {OPTIONAL})")
    n = table.num_rows
    budget = _budget_tokens(table.column("budget"), source)
    numbers = {name: _float_values(table.column(name), name, source)
               for name in ["input_tokens", "output_tokens", *OPTIONAL]
               if name in table.column_names}
    quality = numbers.get("quality", np.full(n, np.nan))
    cost = numbers.get("cost_usd", np.full(n, np.nan))
    given = {name: _given(table.column(name)) for name in OPTIONAL if name in table.column_names}
    no_value = np.zeros(n, dtype=bool)
    query_id = _text(table.column("query_id"), "query_id", source)
    model = _text(table.column("model"), "model", source)
    unparsed = (table.column("_unparsed").to_numpy(zero_copy_only=False)
                if "_unparsed" in table.column_names else np.zeros(n, dtype=bool))
    checks = [  # (row is bad, reason), first match wins
        (unparsed, "not a JSON object"),
        (_blank(query_id), "missing query_id"),
        (_blank(model), "missing model"),
        (~_whole(budget, most=np.iinfo(np.int32).max),
         "budget is not 'default' or a non-negative integer"),
        (~_whole(numbers["input_tokens"]), "input_tokens missing, negative or not an integer"),
        (~_whole(numbers["output_tokens"]), "output_tokens missing, negative or not an integer"),
        (given.get("quality", no_value) & np.isnan(quality), "quality given but not a number"),
        ((quality < 0) | (quality > 1), "quality outside [0, 1]"),
        (given.get("cost_usd", no_value) & np.isnan(cost), "cost_usd given but not a number"),
        ((cost < 0) | np.isinf(cost), "cost_usd negative or infinite"),
    ]
    invalid = _first_reason(n, checks)
    usable = invalid == None  # noqa: E711 — elementwise over an object array
    return pa.table({
        "query_id": query_id, "model": model,
        "budget": _integers(budget, usable, pa.int32()),
        "input_tokens": _integers(numbers["input_tokens"], usable, pa.int64()),
        "output_tokens": _integers(numbers["output_tokens"], usable, pa.int64()),
        "quality": pa.array(quality, pa.float64(), mask=np.isnan(quality)),
        "cost_usd": pa.array(cost, pa.float64(), mask=np.isnan(cost)),
        "run_id": _run_ids(table, source),
        "source": pa.array([source] * n, pa.string()),
        "row": pa.array(np.arange(1, n + 1) if rows is None else rows, pa.int64()),
        "invalid": pa.array(invalid, pa.string()),
    }, schema=ACTUALS_SCHEMA)


def mark_other_runs(actuals: pa.Table, run_id: str) -> pa.Table:
    """Usable rows billed to another run than ``run_id``, marked with a reason naming both ids:
    nightly backlogs reuse query ids, so another night's bills matched this run's keys and fitted
    its correction. Rows that name no run are kept (they cannot be checked)."""
    named = actuals.column("run_id").to_numpy(zero_copy_only=False)
    usable = pc.is_null(actuals.column("invalid")).to_numpy(zero_copy_only=False)
    for other in other_run_ids(actuals, run_id):
        actuals = _with_reason(actuals, usable & (named == other),
                               f"billed to run {other!r}, not run {run_id!r}")
    return actuals


def other_run_ids(actuals: pa.Table, run_id: str) -> list[str]:
    """The run ids the rows name other than ``run_id``, sorted."""
    return sorted(set(pc.unique(actuals.column("run_id")).drop_null().to_pylist()) - {run_id})


def check_run_ids(actuals: pa.Table, run_id: str, where: str) -> None:
    """Refuse actuals of which no row is ``run_id``'s: every row names another run."""
    named = actuals.column("run_id")
    if actuals.num_rows and named.null_count == 0 and run_id not in pc.unique(named).to_pylist():
        raise ActualsError(f"actuals {where}: none of the {actuals.num_rows:,} rows is of run "
                           f"{run_id!r}; they name run(s) {other_run_ids(actuals, run_id)}: give "
                           f"the actuals r2ray execute wrote for run {run_id!r}")


def mark_unknown_arms(actuals: pa.Table, catalog: Catalog) -> pa.Table:
    """Usable rows whose (model, budget) is no arm of ``catalog``, marked."""
    arm = arm_index(catalog, actuals.column("model"), actuals.column("budget"))
    usable = pc.is_null(actuals.column("invalid")).to_numpy(zero_copy_only=False)
    return _with_reason(actuals, usable & (arm < 0),
                        "(model, budget) is not an arm of the run's catalogue")


def mark_duplicates(actuals: pa.Table) -> pa.Table:
    """Rows repeating the (query_id, model, budget) of an earlier usable row, marked; the first
    one is kept (one routed request is billed once)."""
    position = pa.array(np.arange(actuals.num_rows), pa.int64())
    usable = actuals.append_column("_position", position).filter(pc.is_null(actuals["invalid"]))
    first = usable.group_by(KEY, use_threads=False).aggregate([("_position", "min")])
    kept = np.zeros(actuals.num_rows, dtype=bool)
    kept[first.column("_position_min").to_numpy()] = True
    repeated = np.zeros(actuals.num_rows, dtype=bool)
    repeated[usable.column("_position").to_numpy()] = True
    return _with_reason(actuals, repeated & ~kept, DUPLICATE)


def arm_index(catalog: Catalog, models: pa.ChunkedArray, budgets: pa.ChunkedArray) -> np.ndarray:
    """Arm [R] of each (model, budget) row in ``catalog``; -1 where it has no such arm."""
    arms = pa.table({"model": [a.model for a in catalog.arms],
                     "budget": pa.array([a.budget_tokens for a in catalog.arms], pa.int32()),
                     "arm": pa.array(np.arange(catalog.n_arms), pa.int64())})
    rows = pa.table({"model": models, "budget": budgets.cast(pa.int32()),
                     "_position": pa.array(np.arange(len(models)), pa.int64())})
    found = rows.join(arms, ["model", "budget"], join_type="left outer", use_threads=False)
    arm = np.full(len(models), -1, dtype=np.int64)
    hit = found.filter(pc.is_valid(found["arm"]))
    arm[hit.column("_position").to_numpy()] = hit.column("arm").to_numpy()
    return arm


def invalid_counts(actuals: pa.Table) -> tuple[dict[str, int], dict[str, str]]:
    """({reason: rows}, {reason: where its first row is, as 'file row N'})."""
    bad = actuals.filter(pc.is_valid(actuals["invalid"]))
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for reason, source, row in zip(*(bad.column(c).to_pylist()
                                     for c in ("invalid", "source", "row"))):
        counts[reason] = counts.get(reason, 0) + 1
        first.setdefault(reason, f"{source} row {row}")
    return counts, first


# ---- coercion ------------------------------------------------------------------------------------
def _text(column: pa.ChunkedArray, name: str, source: str) -> pa.Array:
    try:
        return column.cast(pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ActualsError(f"actuals {source}: column {name!r} is {column.type}, "
                           "not text") from None


def _run_ids(table: pa.Table, source: str) -> pa.Array:
    """run_id [R] as text; null where the column is absent or the value blank (not said)."""
    if RUN_ID not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    named = _text(table.column(RUN_ID), RUN_ID, source)
    return pc.if_else(pa.array(_blank(named)), pa.scalar(None, pa.string()), named)


def _float_values(column: pa.ChunkedArray, name: str, source: str) -> np.ndarray:
    """float64 [R]; NaN where null or (for text columns) not a number. Decimal columns (a
    warehouse's billing export keeps USD as DECIMAL) are numbers too."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.array([_parse_float(v) for v in column.to_pylist()], dtype=np.float64)
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            or pa.types.is_null(kind)):
        raise ActualsError(f"actuals {source}: column {name!r} is {kind}, not a number")
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)   # nulls come back as NaN


def _given(column: pa.ChunkedArray) -> np.ndarray:
    """bool [R]: a value is there (not null, not blank text): null alone means 'absent'."""
    given = pc.is_valid(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        given = pc.and_(given, pc.invert(pc.fill_null(
            pc.equal(pc.utf8_trim_whitespace(column), ""), True)))
    return np.asarray(given.to_numpy(zero_copy_only=False), dtype=bool)


def _parse_float(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _budget_tokens(column: pa.ChunkedArray, source: str) -> np.ndarray:
    """Budget [R] in tokens as float64 (0 for 'default'; NaN where unreadable)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.array([0.0 if isinstance(v, str) and v.strip().lower() == "default"
                         else _parse_float(v) for v in column.to_pylist()], dtype=np.float64)
    return _float_values(column, "budget", source)


def _whole(values: np.ndarray, most: float = 2.0 ** 53) -> np.ndarray:
    """Integers in [0, most] (NaN and infinities are not)."""
    with np.errstate(invalid="ignore"):
        return (values >= 0) & (values <= most) & (values == np.floor(values))


def _blank(values: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True).to_numpy(
        zero_copy_only=False)


def _integers(values: np.ndarray, usable: np.ndarray, kind: pa.DataType) -> pa.Array:
    ok = usable & _whole(values)
    return pa.array(np.where(ok, values, 0).astype(np.int64), pa.int64(), mask=~ok).cast(kind)


def _first_reason(n: int, checks: list[tuple[np.ndarray, str]]) -> np.ndarray:
    reason = np.full(n, None, dtype=object)
    for bad, text in checks:
        reason[(reason == None) & bad] = text  # noqa: E711 — elementwise over an object array
    return reason


def _with_reason(actuals: pa.Table, rows: np.ndarray, reason: str) -> pa.Table:
    if not rows.any():
        return actuals
    marked = pc.if_else(pa.array(rows), pa.scalar(reason, pa.string()), actuals["invalid"])
    return actuals.set_column(actuals.schema.get_field_index("invalid"), "invalid", marked)
