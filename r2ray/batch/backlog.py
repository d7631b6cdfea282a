"""Reading and validating a routing backlog: every input row ends up routed or quarantined.

A backlog is parquet or jsonl files (a file, a prefix or a glob; local, ``file://`` or ``s3://``)
with columns ``query_id``, ``query`` and optional ``input_tokens``, ``tenant``, ``embedding``.
Work is cut into *read units* (one parquet row group, or one jsonl file) so that a single large file
still spreads over many workers. Each unit is read and validated by a pure function that returns the
good rows plus a quarantine table with a reason per bad row — nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from r2ray import storage
from r2ray.bench.io import blank_line, jsonl_lines
from r2ray.prompting import estimate_tokens_array, lone_surrogate_at

BACKLOG_SUFFIXES = (".parquet", ".jsonl", ".json")
ROW_BITS = 40  # order key = file index << 40 | row: unique, sortable, stable across re-runs

QUARANTINE_SCHEMA = pa.schema([
    pa.field("source", pa.string()),     # file URI
    pa.field("row", pa.int64()),         # 1-based data row (jsonl: line number); null = whole file
    pa.field("query_id", pa.string()),   # when it could be read
    pa.field("reason", pa.string()),
    pa.field("raw", pa.string()),        # the row as read, JSON, so nothing is lost
    pa.field("unread_rows", pa.int64()),  # a unit not read (row null): its rows left unread, from
                                          # the parquet footer; null = a row's record, or unknown
])

GOOD_SCHEMA = pa.schema([
    pa.field("query_id", pa.string()),
    pa.field("query", pa.string()),
    pa.field("input_tokens", pa.int64()),
    pa.field("tenant", pa.string()),
    pa.field("order", pa.int64()),       # file index << ROW_BITS | 0-based row
])


UNREADABLE = (pa.ArrowInvalid, OSError, UnicodeDecodeError)
"""What reading a damaged file raises: Arrow's checks, the file system's and the parquet thrift
reader's (corrupt data, a truncated file; a footer whose column name is not UTF-8, as a latin-1
writer leaves ``café``, raised UnicodeDecodeError out of the plan and failed the whole run)."""


@dataclass(frozen=True)
class ReadUnit:
    """One piece of input: a parquet row group or a whole jsonl file."""

    source: str
    file_index: int
    row_group: int | None = None   # parquet only
    first_row: int = 0             # 0-based row of the unit's first row within its file
    rows: int | None = None        # rows in the unit, from parquet metadata (jsonl: unknown)


def plan_units(input_uri: str | list[str]) -> tuple[list[ReadUnit], pa.Table]:
    """Split the input into read units; unreadable parquet files become quarantine records."""
    units: list[ReadUnit] = []
    broken: list[dict] = []
    for index, source in enumerate(storage.list_files(input_uri, BACKLOG_SUFFIXES)):
        if not source.endswith(".parquet"):
            units.append(ReadUnit(source, index))
            continue
        try:
            fs, path = storage.filesystem(source)
            with fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
        except UNREADABLE as err:
            broken.append({"source": source, "row": None, "query_id": None,
                           "reason": f"unreadable parquet file: {err}", "raw": None})
            continue
        first = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(ReadUnit(source, index, group, first, rows))
            first += rows
    return units, pa.Table.from_pylist(broken, schema=QUARANTINE_SCHEMA)


def read_unit(unit: ReadUnit, slice_rows: int | None = None
              ) -> Iterator[tuple[list[dict] | pa.Table, list[dict]]]:
    """Raw rows of one unit as it is read, in pieces of at most ``slice_rows`` rows (None: one
    piece), so a row group of a million rows or a large jsonl file is never held whole: Arrow
    tables (parquet) or lists of dicts (jsonl), each with its parse failures."""
    fs, path = storage.filesystem(unit.source)
    if unit.row_group is not None:
        with fs.open(path, "rb") as handle:
            file = pq.ParquetFile(handle)
            if slice_rows is None:
                yield without_views(_checked_columns(file.read_row_group(unit.row_group))), []
                return
            for batch in file.iter_batches(batch_size=slice_rows, row_groups=[unit.row_group]):
                yield without_views(_checked_columns(pa.Table.from_batches([batch]))), []
        return
    with fs.open(path, "rb") as handle:
        rows, failures, pieces = [], [], 0
        for line_no, raw in enumerate(jsonl_lines(handle), 1):
            if slice_rows and len(rows) + len(failures) >= slice_rows:
                yield rows, failures
                rows, failures, pieces = [], [], pieces + 1
            if blank_line(raw):
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                failures.append({"source": unit.source, "row": line_no, "query_id": None,
                                 "reason": f"invalid UTF-8 (byte {err.start})",
                                 "raw": raw.decode("utf-8", errors="backslashreplace")})
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
                row["__line"] = line_no
                rows.append(row)
            except (ValueError, RecursionError) as err:   # RecursionError: nested too deep
                failures.append({"source": unit.source, "row": line_no, "query_id": None,
                                 "reason": f"invalid JSON line: {err}", "raw": line})
        if rows or failures or not pieces:
            yield rows, failures


KNOWN_COLUMNS = ("query_id", "query", "input_tokens", "tenant", "embedding")
"""The input columns validation reads (by name); any other column is only kept in ``raw``."""


def _checked_columns(table: pa.Table) -> pa.Table:
    """A parquet piece without any column named ``__line`` (the row numbers validation adds; a
    jsonl field of that name is overwritten alike), or ArrowInvalid where a column of
    :data:`KNOWN_COLUMNS` is there twice (pyarrow writes such a file): which one holds the rows
    is unknown. Either raised a KeyError out of the read task on every retry, failing the run."""
    names = table.column_names
    repeated = sorted({name for name in names if name in KNOWN_COLUMNS and names.count(name) > 1})
    if repeated:
        raise pa.ArrowInvalid(f"more than one column named {', '.join(repeated)}")
    return table.select([i for i, name in enumerate(names) if name != "__line"])


VIEW_TYPES = {pa.string_view(): pa.large_string(), pa.binary_view(): pa.large_binary()}


def without_views(table: pa.Table) -> pa.Table:
    """``table`` with its string_view / binary_view columns as large_string / large_binary.
    Polars 1.38 writes string columns to parquet as views, and pyarrow has no take, filter or
    string kernels for them: every row was quarantined as "not a string", and taking the rows
    crashed the read task on every retry."""
    if not any(f.type in VIEW_TYPES for f in table.schema):
        return table
    return table.cast(pa.schema([f.with_type(VIEW_TYPES.get(f.type, f.type))
                                 for f in table.schema]))


def raw_rows(source: str, rows: list[int]) -> dict[int, str]:
    """{1-based row: the row as stored, JSON} for a few rows of one input file (quarantine
    records of rows that were valid on their own, e.g. duplicates, keep their content)."""
    fs, path = storage.filesystem(source)
    wanted = sorted(set(rows))
    if not source.endswith(".parquet"):
        found, want = {}, set(wanted)
        with fs.open(path, "rb") as handle:
            for row, line in enumerate(jsonl_lines(handle), 1):
                if row > wanted[-1]:
                    break
                if row in want:
                    found[row] = line.decode("utf-8", errors="backslashreplace")
        return found
    found = {}
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.cumsum([0] + sizes)   # 0-based first row of each row group
        group_of = np.searchsorted(starts, np.array(wanted) - 1, side="right") - 1
        for group in np.unique(group_of):
            mine = [r for r, g in zip(wanted, group_of) if g == group]
            table = without_views(parquet.read_row_group(int(group)))
            picked = _listed(table.take(pa.array([r - 1 - starts[group] for r in mine])))
            found.update((r, json.dumps(row, default=str)) for r, row in zip(mine, picked))
    return found


def _listed(table: pa.Table) -> list[dict]:
    """The rows of ``table`` as dicts, for a quarantine record's ``raw``; a column Python cannot
    hold as it is listed by :func:`_column_values`. ``to_pylist`` raised out of the read task (a
    bad row) or the duplicates stage (a repeated id) on every retry, failing the whole run."""
    try:
        return table.to_pylist()
    except (UnicodeDecodeError, OverflowError, ValueError):
        pass
    values = [_column_values(table.column(i)) for i in range(table.num_columns)]
    return [dict(zip(table.column_names, row)) for row in zip(*values)]


def _column_values(column: pa.ChunkedArray) -> list:
    """A column's values: as they are; with its strings as bytes where a string nested in a list
    or struct is not UTF-8 (a foreign writer's bytes read unchecked: :func:`_valid_utf8` checks
    top-level columns only); as Arrow prints them where a date or time lies past Python's range
    (e.g. an export's "infinity" timestamp, the largest int64)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return column.cast(_strings_as_bytes(column.type)).to_pylist()
    except (OverflowError, ValueError):
        return column.cast(pa.string()).to_pylist()


def _strings_as_bytes(kind: pa.DataType) -> pa.DataType:
    """``kind`` with each string type in it, however nested, as the binary type of its width."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.binary() if pa.types.is_string(kind) else pa.large_binary()
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_strings_as_bytes(field.type)) for field in kind])
    if pa.types.is_map(kind):
        return pa.map_(_strings_as_bytes(kind.key_type), _strings_as_bytes(kind.item_type))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        value = kind.value_field.with_type(_strings_as_bytes(kind.value_type))
        return (pa.large_list(value) if pa.types.is_large_list(kind) else
                pa.list_(value, kind.list_size) if pa.types.is_fixed_size_list(kind) else
                pa.list_(value))
    return kind


def _jsonl_table(rows: list[dict], unit: ReadUnit) -> tuple[pa.Table, list[dict]]:
    """jsonl rows → an Arrow table of well-typed fields; rows with wrongly typed fields are bad."""
    kept, bad = [], []
    for row in rows:
        reason = _field_type_problem(row)
        if reason is None:
            kept.append(row)
        else:
            bad.append(_bad(unit.source, row.pop("__line"), row, reason))
    columns = {name: [r.get(name) for r in kept] for name in KNOWN_COLUMNS
               if any(name in r for r in kept)}
    columns["__line"] = [r["__line"] for r in kept]
    types = {"query_id": pa.string(), "query": pa.string(), "input_tokens": pa.float64(),
             "tenant": pa.string(), "embedding": pa.list_(pa.float64()), "__line": pa.int64()}
    table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
    return table, bad


def _field_type_problem(row: dict) -> str | None:
    checks = (("query_id", (str, int)), ("query", (str,)), ("input_tokens", (int, float)),
              ("tenant", (str,)), ("embedding", (list,)))
    for name, allowed in checks:
        value = row.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, allowed)):
            return f"{name} is a {type(value).__name__}, not a {' or '.join(t.__name__ for t in allowed)}"
    for name in ("query_id", "query", "tenant"):
        at = lone_surrogate_at(row.get(name))
        if at is not None:   # a JSON escape of half a pair: Arrow cannot hold it as UTF-8
            return f"{name} holds a lone surrogate ({row[name][at]!a} at character {at})"
    vector = row.get("embedding")
    if vector is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      for v in vector):
        return "embedding holds non-numeric values"
    # Arrow refuses an int past 2**53 in a float64 column: quarantine it, never crash the unit
    tokens = row.get("input_tokens")
    if isinstance(tokens, int) and abs(tokens) > 2 ** 53:
        return f"input_tokens {tokens} is too large"
    if vector is not None and any(isinstance(v, int) and abs(v) > 2 ** 53 for v in vector):
        return "embedding holds an integer too large for a float"
    if "query_id" in row and isinstance(row["query_id"], int):
        row["query_id"] = str(row["query_id"])
    return None


def _bad(source: str, line: int | None, row: dict | None, reason: str) -> dict:
    return {"source": source, "row": line, "query_id": _record_id((row or {}).get("query_id")),
            "reason": reason, "raw": None if row is None else json.dumps(row, default=str)}


def _record_id(query_id) -> str | None:
    """A quarantine record's ``query_id``: the row's id as a routed row would carry it, an
    integer id as its digits (a parquet int64 column, a jsonl number: both are valid ids, and
    their bad rows' records named no id); None where it has none that Arrow can hold."""
    if isinstance(query_id, int) and not isinstance(query_id, bool):
        return str(query_id)
    return query_id if isinstance(query_id, str) and lone_surrogate_at(query_id) is None else None


def validate_table(table: pa.Table, unit: ReadUnit, max_context_tokens: int,
                   embedding_dim: int, embedding_required: bool = False
                   ) -> tuple[pa.Table, pa.Table]:
    """(good rows: GOOD_SCHEMA + ``embedding`` list<float32>, null = encode the text; quarantine
    rows with a reason each), vectorised.

    ``table`` carries a ``__line`` column (1-based row or line number in the source file).
    ``max_context_tokens``: the largest context window in the catalogue; a query at least that long
    fits no model. ``embedding_dim``: the predictor's input size. ``embedding_required``: the
    model has no text encoder, so a row without a usable embedding cannot be scored.
    """
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, reason) -> None:
        mask = np.asarray(mask, dtype=bool) & (reasons == None)  # noqa: E711 (elementwise)
        reasons[mask] = reason if isinstance(reason, str) else [reason(i) for i in np.flatnonzero(mask)]

    table = _valid_utf8(table, flag)
    query_id = _string_column(table, "query_id", flag)
    query = _string_column(table, "query", flag)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(query)), 0)
    flag(_filled(blank, False), "empty or whitespace-only query")
    input_tokens = _input_tokens(table, query, flag)
    flag(input_tokens >= max_context_tokens, lambda i: (
        f"query is {int(input_tokens[i])} tokens; no model's context window "
        f"(largest {max_context_tokens}) leaves room for an answer"))
    tenant = _optional_string(table, "tenant", n, flag)
    embedding = (_check_embeddings(table.column("embedding"), embedding_dim, flag)
                 if "embedding" in table.column_names else pa.nulls(n, EMBEDDING_TYPE))
    if embedding_required:
        flag(embedding.is_null().to_numpy(zero_copy_only=False),
             "no embedding; the model names no text encoder, so every query needs one")

    bad = np.flatnonzero(reasons != None)  # noqa: E711
    bad = bad[np.argsort(table.column("__line").to_numpy()[bad], kind="stable")]
    lines = table.column("__line").to_numpy()
    good_index = pa.array(np.flatnonzero(reasons == None)) if len(bad) else None  # noqa: E711

    def rows(array: pa.Array) -> pa.Array:  # all good, the usual case: no copy
        return array if good_index is None else array.take(good_index)

    good = pa.table({
        "query_id": rows(query_id), "query": rows(query),
        "input_tokens": rows(pa.array(   # past the context: flagged above, and kept in int64
            np.minimum(input_tokens, max_context_tokens).astype(np.int64))),
        "tenant": rows(tenant),
        "order": rows(pa.array((unit.file_index << ROW_BITS) | (lines - 1))),
    }, schema=GOOD_SCHEMA)
    good = good.append_column("embedding", rows(embedding))
    fields = table.drop_columns(["__line"])
    # a table of no known column (jsonl rows of only unknown keys) has no rows to list
    raw_rows = ((_listed(fields.take(pa.array(bad))) if fields.num_columns
                 else [{} for _ in bad]) if len(bad) else [])
    quarantine = [_bad(unit.source, int(lines[i]), raw, reasons[i]) for i, raw in zip(bad, raw_rows)]
    return good, pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)


def _filled(array, value) -> np.ndarray:
    return pc.fill_null(array, value).to_numpy(zero_copy_only=False)


def _valid_utf8(table: pa.Table, flag) -> pa.Table:
    """``table`` with each string value that is not valid UTF-8 flagged and its bytes kept
    backslash-escaped. Parquet readers do not check a string column's bytes (a foreign writer's
    bad bytes read as they are): Arrow's string kernels then raised out of the read task on every
    retry, and listing a bad row's ``raw`` did too. Any string column counts, as any byte of a
    jsonl line does (``read_unit``: "invalid UTF-8")."""
    for index, name in enumerate(table.column_names):
        kind = table.column(name).type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            continue   # before combining chunks: an embedding column is not copied for nothing
        column = _decoded(table.column(name).combine_chunks())
        try:
            column.validate(full=True)   # the usual case: one pass over the bytes, no copy
            continue
        except pa.ArrowInvalid:
            pass
        values = column.cast(pa.binary() if pa.types.is_string(column.type)
                             else pa.large_binary()).to_pylist()
        bad_at = [None if v is None else _bad_utf8_at(v) for v in values]
        flag(np.array([at is not None for at in bad_at], dtype=bool),
             lambda i: f"invalid UTF-8 in {name} (byte {bad_at[i]})")
        text = [None if v is None else v.decode("utf-8", errors="backslashreplace")
                for v in values]
        table = table.set_column(index, name, pa.array(text, column.type))
    return table


def _bad_utf8_at(value: bytes) -> int | None:
    """The offset of the first byte of ``value`` that is not UTF-8; None: all of it is."""
    try:
        value.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        return err.start


def _decoded(column: pa.Array) -> pa.Array:
    """A dictionary-encoded column (pandas ``category``) as its plain values."""
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _string_column(table: pa.Table, name: str, flag) -> pa.Array:
    if name not in table.column_names:
        flag(np.ones(table.num_rows, bool), f"missing {name} (the input has no '{name}' column)")
        return pa.nulls(table.num_rows, pa.string())
    column = _decoded(table.column(name).combine_chunks())
    if pa.types.is_integer(column.type) and name == "query_id":
        column = column.cast(pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        flag(np.ones(table.num_rows, bool), f"{name} is {column.type}, not a string")
        return pa.nulls(table.num_rows, pa.string())
    column = column.cast(pa.string())
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0) if name == "query_id" \
        else pa.array(np.zeros(len(column), bool))
    flag(_filled(pc.or_kleene(pc.is_null(column), empty), True), f"missing {name}")
    return column


def _input_tokens(table: pa.Table, query: pa.Array, flag) -> np.ndarray:
    """Given counts where present and valid, estimated from the text (float64 [n]) by
    :func:`r2ray.prompting.estimate_tokens_array` (the estimate Serve uses too) where null or
    absent. A value that is not a positive integer, NaN included (a float column's NaN is a
    bad count, not a missing one: parquet and jsonl both tell it from null), is flagged: 0 too,
    since a query with text is at least one token (a 0 would price the prompt as free, and Serve
    refuses it)."""
    estimate = estimate_tokens_array(query).astype(np.float64)
    if "input_tokens" not in table.column_names:
        return estimate
    column = table.column("input_tokens").combine_chunks()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_null(column.type)):
        flag(np.ones(table.num_rows, bool), f"input_tokens is {column.type}, not a number")
        return estimate
    missing = _filled(pc.is_null(column), True)
    given = _filled(column.cast(pa.float64(), safe=False), np.nan)   # 2**60: huge, not a crash
    flag(~missing & ~(np.isfinite(given) & (given >= 1) & (given == np.floor(given))),
         lambda i: f"input_tokens {given[i]:g} is not a positive integer")
    return np.where(missing | ~np.isfinite(given) | (given < 1), estimate, given)


def _optional_string(table: pa.Table, name: str, n: int, flag) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(n, pa.string())
    column = _decoded(table.column(name).combine_chunks())
    if pa.types.is_null(column.type):
        return column.cast(pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        flag(np.ones(n, bool), f"{name} is {column.type}, not a string")
        return pa.nulls(n, pa.string())
    return column.cast(pa.string())


EMBEDDING_TYPE = pa.list_(pa.float32())


def _check_embeddings(column, embedding_dim: int, flag) -> pa.Array:
    """Flag wrong lengths and non-finite values; return list<float32> with null = none given."""
    column = column.combine_chunks()
    n = len(column)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        flag(np.ones(n, bool), f"embedding is {column.type}, not a list of numbers")
        return pa.nulls(n, EMBEDDING_TYPE)
    value_type = column.type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)
            or pa.types.is_decimal(value_type) or pa.types.is_null(value_type)):
        flag(np.ones(n, bool), f"embedding is {column.type}, not a list of numbers")
        return pa.nulls(n, EMBEDDING_TYPE)
    lengths = _filled(pc.list_value_length(column), -1)
    present = lengths >= 0
    flag(present & (lengths != embedding_dim),
         lambda i: f"embedding has {lengths[i]} values; the model expects {embedding_dim}")
    # float32 as the model reads it (a float64 beyond float32's range is flagged, not passed on
    # as inf); rows of non-finite values looked up only when there are any
    values = pc.list_flatten(column).cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    finite = np.ones(n, dtype=bool)
    not_finite = np.flatnonzero(~np.isfinite(values))
    if not_finite.size:
        finite[pc.list_parent_indices(column).to_numpy()[not_finite]] = False
    flag(present & ~finite, "embedding holds NaN or infinite values")
    usable = present & (lengths == embedding_dim) & finite
    if usable.all():   # the usual case: the flattened values as they are, no copy
        offsets = np.arange(0, (n + 1) * embedding_dim, embedding_dim, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
    keep = usable[pc.list_parent_indices(column).to_numpy()]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.where(usable, embedding_dim, 0), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep], pa.float32()),
                                    mask=pa.array(~usable))


def read_and_validate(unit: ReadUnit, max_context_tokens: int, embedding_dim: int,
                      embedding_required: bool = False) -> tuple[pa.Table, pa.Table]:
    """Read one unit and validate it, whole: (good rows, quarantine rows)."""
    pieces = list(validated_slices(unit, max_context_tokens, embedding_dim, embedding_required))
    return (pa.concat_tables([empty_good(), *(good for good, _ in pieces)]),
            pa.concat_tables([_no_bad(), *(bad for _, bad in pieces)]))


def validated_slices(unit: ReadUnit, max_context_tokens: int, embedding_dim: int,
                     embedding_required: bool = False, slice_rows: int | None = None
                     ) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(good rows, quarantine rows) of each piece of one unit as it is read (``read_unit``). A
    unit that cannot be read is quarantined whole; one that fails part-way keeps the pieces
    already read and quarantines the rest as one record naming the first row not read."""
    first, pieces = unit.first_row, read_unit(unit, slice_rows)
    while True:
        try:
            raw, failures = next(pieces)
        except StopIteration:
            return
        except UNREADABLE as err:
            yield empty_good(), _unread_rest(unit, first, err)
            return
        if isinstance(raw, pa.Table):
            lines = np.arange(first + 1, first + raw.num_rows + 1)
            first += raw.num_rows
            table = raw.append_column("__line", pa.array(lines, pa.int64()))
        else:   # the next unread line: past the last one this piece holds
            first = max([row["__line"] for row in raw] + [f["row"] for f in failures] + [first])
            table, type_failures = _jsonl_table(raw, unit)
            failures += type_failures
        good, bad = validate_table(table, unit, max_context_tokens, embedding_dim,
                                   embedding_required)
        if not isinstance(raw, pa.Table) and bad.num_rows:
            bad = _with_rows_as_read(bad, raw)
        if failures:
            bad = pa.concat_tables([pa.Table.from_pylist(failures, schema=QUARANTINE_SCHEMA),
                                    bad]).sort_by("row")
        yield good, bad


def _unread_rest(unit: ReadUnit, first: int, err: Exception) -> pa.Table:
    """The one quarantine record of a unit that failed from 0-based row ``first`` on, with the
    count of rows it left unread where the parquet footer gives the unit's size (jsonl: unknown)."""
    where = "" if first == unit.first_row else \
        f" from row {first + 1} on (the rows before it were read)"
    unread = None if unit.rows is None else unit.first_row + unit.rows - first
    counted = "" if unread is None else f", {unread} rows not read"
    record = _bad(unit.source, None, None, f"unreadable input{where}{counted}: {err}")
    return pa.Table.from_pylist([{**record, "unread_rows": unread}], schema=QUARANTINE_SCHEMA)


def _with_rows_as_read(bad: pa.Table, rows: list[dict]) -> pa.Table:
    """jsonl quarantine records whose ``raw`` is the whole row as read, every field kept (the
    validated table holds the known fields only, and none at all for a row of unknown keys)."""
    by_line = {row["__line"]: row for row in rows if "__line" in row}
    raw = [json.dumps({k: v for k, v in by_line[line].items() if k != "__line"}, default=str)
           for line in bad.column("row").to_pylist()]
    return bad.set_column(bad.schema.get_field_index("raw"), QUARANTINE_SCHEMA.field("raw"),
                          pa.array(raw, pa.string()))


def empty_good() -> pa.Table:
    return pa.Table.from_pylist([], schema=GOOD_SCHEMA.append(pa.field("embedding", EMBEDDING_TYPE)))


def _no_bad() -> pa.Table:
    return pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA)


# ---- the read stage (Ray tasks, one read unit per call) ---------------------------------------
def read_stage(batch: dict, quarantine_uri: str, max_context_tokens: int, embedding_dim: int,
               embedding_required: bool, slice_rows: int | None = None) -> Iterator[pa.Table]:
    """Read units → good rows, yielded every ``slice_rows`` rows as they are read (so scoring
    starts on a unit's first rows, and a huge row group never sits whole in a worker); each
    unit's bad rows go to ``quarantine/part-<file>-<group>`` once it is read."""
    from r2ray.bench.io import write_table

    yielded = False
    for i in range(len(batch["source"])):
        row_group = batch["row_group"][i]
        rows = batch["rows"][i]
        unit = ReadUnit(str(batch["source"][i]), int(batch["file_index"][i]),
                        None if row_group is None or row_group < 0 else int(row_group),
                        int(batch["first_row"][i]), None if rows is None or rows < 0 else int(rows))
        bads = []
        for good, bad in validated_slices(unit, max_context_tokens, embedding_dim,
                                          embedding_required, slice_rows):
            bads += [bad] if bad.num_rows else []
            if good.num_rows:
                yielded = True
                yield good
        if bads:
            name = f"part-f{unit.file_index:06d}-g{max(unit.row_group or 0, 0):06d}.parquet"
            write_table(pa.concat_tables(bads), storage.join(quarantine_uri, name))
    if not yielded:   # an empty output still carries the schema
        yield empty_good()


def unit_items(units: list[ReadUnit]) -> list[dict]:
    """Read units as Ray Data items (a missing row group or row count is -1: Arrow columns need
    one type); the row count lets a unit that fails say how many rows it left unread."""
    return [{**dataclasses.asdict(u), "row_group": -1 if u.row_group is None else u.row_group,
             "rows": -1 if u.rows is None else u.rows} for u in units]


def planned_rows(units: list[ReadUnit]) -> int | None:
    """Rows the parquet metadata counts in ``units`` (a lower bound when jsonl files are among
    them, whose rows are known only once read); None when no unit has a count."""
    counts = [u.rows for u in units if u.rows is not None]
    return sum(counts) if counts else None


def footer_rows(units: list[ReadUnit]) -> int | None:
    """Rows in ``units`` as the parquet footers count them, when every unit has a count (0 for
    none); None when a jsonl file is among them, whose rows are known only once read. The job
    checks every row it read, quarantined or left unread against this before it commits."""
    return None if any(u.rows is None for u in units) else sum(u.rows for u in units)
