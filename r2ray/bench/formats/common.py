"""What every adapter shares: its result type, source readers that name file/row/field on error,
value parsers, and the re-pointing of long-format validation errors at source rows.

Rows are 1-based data rows of the source: the line number in a jsonl file, the record number
after the header in a CSV file.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from r2ray import storage
from r2ray.bench.io import blank_line, jsonl_lines
from r2ray.bench.schema import (
    BENCH_SCHEMA, REQUIRED_COLUMNS, BenchError, at_source_row, bench_error, validate_bench,
)
from r2ray.catalog import Catalog


class ModelPrice(NamedTuple):
    """Prices in USD per million tokens, context window in tokens (None: unknown), and where the
    numbers came from (shown in the catalogue written beside the bench)."""

    input_per_m: float
    output_per_m: float
    context: int | None
    origin: str


@dataclass(frozen=True)
class AdapterOptions:
    """``catalog``: the ``--catalog`` file, else the default pool; ``catalog_explicit`` says which.
    ``model_names``: ``--model``, one per input file, in order."""

    catalog: Catalog
    catalog_explicit: bool = False
    model_names: list[str] | None = None


@dataclass
class SourcePart:
    """Long-format rows from one source file; ``source_rows`` [rows] gives each row's source row."""

    source: str
    table: pa.Table
    source_rows: np.ndarray


class RowCollector:
    """Accumulates long-format rows (keyword per column) with the source row of each."""

    def __init__(self, source: str):
        self.source = source
        self.columns: dict[str, list] = {f.name: [] for f in BENCH_SCHEMA}
        self.source_rows: list[int] = []

    def add(self, source_row: int, **values: Any) -> None:
        unknown = values.keys() - self.columns.keys()
        if unknown:
            raise TypeError(f"not bench columns: {sorted(unknown)}")
        for name, column in self.columns.items():
            column.append(values.get(name))
        self.source_rows.append(source_row)

    def part(self) -> SourcePart:
        """The rows as a table; optional columns (``response``, ``cost_usd``) only if ever set."""
        fields = [f for f in BENCH_SCHEMA if f.name in REQUIRED_COLUMNS
                  or any(v is not None for v in self.columns[f.name])]
        table = pa.Table.from_arrays([pa.array(self.columns[f.name], type=f.type) for f in fields],
                                     schema=pa.schema(fields))
        return SourcePart(self.source, table, np.asarray(self.source_rows, dtype=np.int64))


@dataclass
class Converted:
    """An adapter's result: rows per source file, prices the source itself gives, notes for the
    summary (what was estimated, skipped or clipped)."""

    parts: list[SourcePart]
    prices: dict[str, ModelPrice] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def beside(uri: str, name: str) -> str:
    """The URI of ``name`` in the same directory as ``uri``."""
    return storage.join(posixpath.dirname(str(uri)), name)


def stem(uri: str) -> str:
    """File name without directory and suffix: ``.../gemini-2.0-flash-001.jsonl`` -> model name."""
    name = posixpath.basename(str(uri))
    return name.rsplit(".", 1)[0] if "." in name else name


# ---- readers ---------------------------------------------------------------------------------
def iter_jsonl(uri: str) -> Iterator[tuple[int, dict]]:
    """(row, object) for each non-blank line; a bad line is an error naming file and row.

    Lines and blanks are the rule every jsonl reader shares (:func:`~r2ray.bench.io.jsonl_lines`,
    :func:`~r2ray.bench.io.blank_line`): lines end at ``\n`` only, a leading byte-order mark is
    dropped, and a line of a form feed or U+00A0 is a bad row, not one skipped."""
    for row, raw in enumerate(jsonl_lines(io.BytesIO(storage.read_bytes(uri))), 1):
        if blank_line(raw):
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise bench_error(uri, row - 1, None, f"not UTF-8 text (byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise bench_error(uri, row - 1, None, f"invalid JSON ({err.msg} at column {err.colno})"
                              ) from None
        if not isinstance(record, dict):
            raise bench_error(uri, row - 1, None,
                              f"expected a JSON object, got {type(record).__name__}")
        yield row, record


def read_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchError(f"{uri}: not valid JSON ({err})") from None


def read_csv_strings(uri: str) -> tuple[pa.Table, int]:
    """A CSV file with every column as (nullable) strings, plus the count of undecodable bytes
    replaced (published CSVs are not always clean UTF-8). A truncated or ragged file is an error
    naming the first bad row. Only an empty field is missing: text such as ``N/A``, ``NA`` or
    ``null`` (an answer a model may give) is kept as text. A leading byte-order mark (Excel's
    "CSV UTF-8") is dropped, so the first column keeps its name."""
    raw = storage.read_bytes(uri)
    text = raw.decode("utf-8-sig", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    try:
        header = next(csv.reader(io.StringIO(text)))
    except (StopIteration, csv.Error):
        raise BenchError(f"{uri}: empty or garbled CSV (no header row)") from None
    try:
        table = pacsv.read_csv(
            pa.BufferReader(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(block_size=1 << 26),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, null_values=[""],
                strings_can_be_null=True))
    except pa.ArrowInvalid as err:
        raise _locate_csv_error(uri, text, len(header), err) from None
    return table, replaced


def _locate_csv_error(uri: str, text: str, n_fields: int, err: Exception) -> BenchError:
    records = csv.reader(io.StringIO(text))
    next(records)
    row = 0
    try:
        for row, record in enumerate(records, 1):
            if len(record) != n_fields:
                return bench_error(uri, row - 1, None, f"expected {n_fields} fields, got "
                                   f"{len(record)} (truncated or garbled CSV)")
    except csv.Error as bad:
        return bench_error(uri, row, None, f"garbled CSV ({bad})")
    return BenchError(f"{uri}: garbled CSV ({err})")


def require_columns(table: pa.Table, needed: list[str], source: str) -> None:
    """Each needed column present exactly once (a repeated header would be ambiguous)."""
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise bench_error(source, None, missing[0], f"missing column(s) {missing}; "
                          f"the file has {table.column_names}")
    repeated = [name for name in needed if table.column_names.count(name) > 1]
    if repeated:
        raise bench_error(source, None, repeated[0], f"column(s) {repeated} appear more than "
                          "once in the header; which one holds the data is ambiguous")


# ---- values ----------------------------------------------------------------------------------
def is_blank(value: Any) -> bool:
    """Missing, not zero: None, empty or whitespace text, or NaN (pandas' missing value)."""
    return (value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, float) and np.isnan(value)))


def lookup(record: dict, path: str, source: str, row: int) -> Any:
    """``record['a']['b']`` for ``path='a.b'``; a missing key is an error naming the field."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise bench_error(source, row - 1, path, "is missing")
        value = value[key]
    return value


NUMERIC_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
"""A number as a CSV or JSON file writes one: ASCII digits, an optional sign, point and exponent.
Python's ``float`` also takes ``1_000``, ``1_0.5`` (10.5) and non-ASCII digits (``٣``, ``１``),
which no data file means as numbers."""


def number(value: Any, source: str, row: int, field: str, low: float | None = None,
           high: float | None = None) -> float:
    """A finite number from a JSON number or a numeric string (:data:`NUMERIC_TEXT`, surrounding
    whitespace allowed), optionally within [low, high]."""
    parsed = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            parsed = float(value)
        except OverflowError:  # a JSON integer beyond float64
            parsed = None
    elif isinstance(value, str) and NUMERIC_TEXT.fullmatch(value.strip()):
        parsed = float(value.strip())  # overflows to inf, refused below
    if parsed is None or not np.isfinite(parsed):
        raise bench_error(source, row - 1, field, f"{value!r} is not a number")
    if (low is not None and parsed < low) or (high is not None and parsed > high):
        raise bench_error(source, row - 1, field, f"{parsed!r} is outside "
                          f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]")
    return parsed


def count(value: Any, source: str, row: int, field: str) -> int:
    """A non-negative whole number of tokens from a number or numeric string."""
    parsed = number(value, source, row, field)
    if parsed < 0:
        raise bench_error(source, row - 1, field, f"{parsed:g} tokens is negative")
    if not parsed.is_integer():
        raise bench_error(source, row - 1, field, f"{parsed!r} is not a whole number of tokens")
    return int(parsed)


def identifier(value: Any, source: str, row: int, field: str) -> str:
    """An id given as non-empty text or a whole number (never ``None`` read as "None"). A whole
    float is the integer's text: pandas stores an integer column as float64 (3.0), and the same
    ids read from a CSV are "3"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise bench_error(source, row - 1, field, f"expected text or a whole number, got {value!r}")
    return text(value, source, row, field)


def any_text(value: Any, source: str, row: int, field: str) -> str:
    """Text that may be empty (an answer), or a JSON number written as text; null is an error."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise bench_error(source, row - 1, field, f"expected text, got {value!r}")
    return value


def text(value: Any, source: str, row: int, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bench_error(source, row - 1, field, f"expected non-empty text, got {value!r}")
    return value


# ---- validation ------------------------------------------------------------------------------
def validate_parts(parts: list[SourcePart]) -> pa.Table:
    """Validate each part under its source file's name, then all parts together (duplicates
    across files); every error names the source file and row the bad bench row came from."""
    _check_every_source_has_rows(parts)
    tables = [_validate(part.table, [part.source], np.zeros(part.table.num_rows, np.int64),
                        part.source_rows, part.source) for part in parts]
    if len(tables) == 1:
        return tables[0]
    combined = pa.concat_tables(tables, promote_options="default")
    which = np.concatenate([np.full(t.num_rows, i) for i, t in enumerate(tables)]).astype(np.int64)
    rows = np.concatenate([part.source_rows for part in parts])
    return _validate(combined, [part.source for part in parts], which, rows, "all inputs")


def _check_every_source_has_rows(parts: list[SourcePart]) -> None:
    """An input file that yields no bench row (empty, header only, every arm blank) is an error
    naming it, never a silent nothing (nor, for the only input, an empty catalogue)."""
    rows: dict[str, int] = {}
    for part in parts:
        rows[part.source] = rows.get(part.source, 0) + part.table.num_rows
    empty = [source for source, n in rows.items() if n == 0]
    if empty or not parts:
        raise BenchError(f"{empty[0] if empty else 'the inputs'}: no bench rows (the file is "
                         "empty, has a header only, or every arm in it is blank)")


def _validate(table: pa.Table, sources: list[str], which: np.ndarray, rows: np.ndarray,
              label: str) -> pa.Table:
    try:
        table = validate_bench(table, label)
        _check_finite_costs(table, label)
        return table
    except BenchError as err:
        if err.row is None:
            raise
        raise at_source_row(err, sources[which[err.row]], rows) from None


def _check_finite_costs(table: pa.Table, source: str) -> None:
    """A blank cost is null (unknown); NaN or infinity is a garbled one, which no fit survives."""
    if "cost_usd" not in table.column_names:
        return
    cost = table.column("cost_usd")
    bad = np.flatnonzero(pc.invert(pc.fill_null(pc.is_finite(cost), True)).to_numpy(
        zero_copy_only=False))
    if bad.size:
        raise bench_error(source, int(bad[0]), "cost_usd",
                          f"{cost[int(bad[0])].as_py()} is not a finite number")
