"""Reading and writing bench tables (parquet or jsonl, any fsspec URI), whole or streamed."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from r2ray import storage
from r2ray.bench.schema import (BenchError, at_source_row, bench_error, check_unique_across,
                                row_keys, validate_bench)
from r2ray.catalog import Catalog
from r2ray.errors import R2RayError

SUFFIXES = (".parquet", ".jsonl", ".json")
WRITE_SUFFIXES = (".parquet", ".jsonl")  # readers also take .json, read as jsonl: never written


def check_output_name(uri: str, option: str) -> None:
    """Readers know a file by its suffix: refuse, up front, a name no reader would pick up."""
    if not str(uri).endswith(WRITE_SUFFIXES):
        raise R2RayError(f"{option} {uri}: name a .parquet or .jsonl file (the suffix picks the "
                         "format, and readers skip other names)")
    refuse_folder(uri, option)


def refuse_folder(uri: str, option: str) -> None:
    """An output file's name taken by a folder: refused up front, not an IsADirectoryError
    traceback from the final rename once the work (or a collect's spend) is done."""
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        raise R2RayError(f"{option} {uri} is a folder: name a file (r2ray does not write into "
                         "or over a folder here)")


def check_apart(outputs: list[tuple[str, str]],
                inputs: list[tuple[str, str]] | None = None) -> None:
    """Refuse, before anything is read or written, an output (option, URI) that names an input or
    another output: the write would replace the user's source file, or one of two outputs would
    silently replace the other."""
    seen: dict[str, str] = {}
    for option, uri in inputs or []:
        seen.setdefault(storage.canonical_uri(uri), f"{option} {uri}")
    for option, uri in outputs:
        key = storage.canonical_uri(uri)
        if key in seen:
            raise R2RayError(f"{option} {uri} names the same file as {seen[key]}: r2ray would "
                             f"write over it — give {option} another name")
        seen[key] = f"{option} {uri}"


def read_table(uri: str) -> pa.Table:
    """Read one parquet or jsonl file into Arrow; a garbled file is a :class:`BenchError`."""
    return _read_file(uri)[0]


def read_table_rows(uri: str) -> tuple[pa.Table, np.ndarray]:
    """:func:`read_table` and [rows] the source row of each table row, 1-based, as errors name
    it: its data row in parquet, the line it starts on in jsonl (after a blank line, which holds
    no row, a row's line is not its position in the table)."""
    table, data = _read_file(uri)
    if data is None or not table.num_rows:
        return table, np.arange(1, table.num_rows + 1)
    return table, jsonl_row_lines(data, table.num_rows)


def _read_file(uri: str) -> tuple[pa.Table, bytes | None]:
    """The table, and for jsonl the bytes it was read from (None: parquet)."""
    fs, path = storage.filesystem(uri)
    with _readable(uri), fs.open(path, "rb") as handle:
        if path.endswith(".parquet"):
            return pq.read_table(handle), None
        data = handle.read()
        return _read_jsonl(data, uri), data


@contextlib.contextmanager
def _readable(uri: str) -> Iterator[None]:
    """A file that is missing, garbled or no table is a :class:`BenchError` naming it."""
    try:
        yield
    except BenchError:
        raise
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        kind = "parquet" if str(uri).endswith(".parquet") else "jsonl"
        raise BenchError(f"{uri}: not a readable {kind} file ({err})") from None


JSON_SPACE = " \t\r\n"   # what JSON (and pyarrow, between rows) skips; str.strip() skips more
JSON_KINDS = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
              dict: "object"}   # what JSON calls the kind of a value json.loads gives; null: none


def jsonl_lines(handle: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a jsonl file as it is read, split on ``\\n`` only (JSON strings may hold U+2028
    and friends), without the line end (``\\n`` or ``\\r\\n``) and without a UTF-8 byte order
    mark at the start of the file (Windows tools write one; it is not part of the first row).
    Line ``n`` (1-based) of this is what every reader means by a jsonl row's line: the bench
    (:func:`jsonl_row_lines`) and the batch job's backlog, which streams it from a file."""
    for number, line in enumerate(handle):
        if number == 0 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        line = line[:-1] if line.endswith(b"\n") else line
        yield line[:-1] if line.endswith(b"\r") else line


def blank_line(line: bytes) -> bool:
    """A line with no row: JSON whitespace only (as pyarrow: a form feed or U+00A0 is no blank,
    so such a line is a bad row, not one skipped)."""
    return not line.strip(JSON_SPACE.encode())


def jsonl_row_lines(data: bytes, rows: int) -> np.ndarray:
    """[rows] the 1-based line each of the ``rows`` rows pyarrow read from jsonl ``data`` starts
    on: each line that is not blank, in the usual layout of one row a line; else (several rows on
    a line, or one over several lines, which pyarrow reads too) where each JSON value starts."""
    filled = [n for n, line in enumerate(jsonl_lines(io.BytesIO(data)), 1) if not blank_line(line)]
    if len(filled) == rows:
        return np.asarray(filled, np.int64)
    return np.asarray(_value_lines(data.decode("utf-8-sig", errors="replace"), rows), np.int64)


def _value_lines(text: str, rows: int) -> list[int]:
    """The 1-based line each of the first ``rows`` JSON values in ``text`` starts on."""
    decoder, lines, pos, line, counted = json.JSONDecoder(), [], 0, 1, 0
    while len(lines) < rows:
        while pos < len(text) and text[pos] in JSON_SPACE:
            pos += 1
        line, counted = line + text.count("\n", counted, pos), pos
        lines.append(line)
        try:
            pos = decoder.raw_decode(text, pos)[1]
        except (json.JSONDecodeError, RecursionError):   # pyarrow read it: not expected
            return list(range(1, rows + 1))   # the data rows, as before
    return lines


def _read_jsonl(data: bytes, uri: str) -> pa.Table:
    """jsonl via pyarrow; on a parse error, find the offending line for the message."""
    if not data.strip():
        return pa.table({})
    try:
        return pajson.read_json(pa.BufferReader(data),
                                read_options=pajson.ReadOptions(block_size=1 << 26))
    except pa.ArrowInvalid as err:
        raise _first_unreadable_line(data, uri) or BenchError(
            f"{uri}: not a readable jsonl file ({err})") from None


def _first_unreadable_line(data: bytes, uri: str) -> BenchError | None:
    """The error at the first line pyarrow could not read: invalid JSON, or a field of another
    JSON kind than in the rows before (``"0.5"`` under numbers), which pyarrow names by its row
    in a block, 0-based, blank lines skipped: not the line. Lines as pyarrow reads them
    (jsonl_lines: at "\\n" only, so a string holding a raw U+2028 is not cut and a good line
    blamed; a leading byte-order mark skipped)."""
    kinds: dict[str, str] = {}   # field -> the JSON kind its first non-null value has
    for line_no, raw in enumerate(jsonl_lines(io.BytesIO(data)), 1):
        if blank_line(raw):
            continue
        try:
            record = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as bad:
            return BenchError(f"{uri}, row {line_no}: invalid JSON ({bad.msg})")
        except RecursionError:
            return BenchError(f"{uri}, row {line_no}: invalid JSON (nested too deeply)")
        for field, value in record.items() if isinstance(record, dict) else ():
            kind = JSON_KINDS.get(type(value))
            first = kinds.setdefault(field, kind) if kind else None
            if first != kind:
                return bench_error(uri, line_no - 1, field, f"a JSON {kind} where the rows "
                                   f"before hold a {first}: give every row the same kind")
    return None


def read_bench(uris: str | Iterable[str], catalog: Catalog | None = None) -> pa.Table:
    """Read and validate a bench from files, directories or globs (parquet and/or jsonl)."""
    files = storage.list_files(uris, SUFFIXES)
    tables = [_read_valid_bench(uri, catalog) for uri in files]
    try:   # duplicates across files
        check_unique_across([row_keys(t, i) for i, t in enumerate(tables)], files)
    except BenchError as err:
        raise at_file_line(err) from None
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _read_valid_bench(uri: str, catalog: Catalog | None) -> pa.Table:
    """One bench file, validated; an error at a row of a jsonl file names the line it is on."""
    table = read_table(uri)
    try:
        return validate_bench(table, uri, catalog)
    except BenchError as err:
        raise at_file_line(err) from None


def at_file_line(err: BenchError) -> BenchError:
    """``err``, about a table row of its bench file, pointed at the line that row is on where the
    file is jsonl (found by reading the file again, on an error only); else ``err`` itself."""
    if err.row is None or err.source is None or not err.source.endswith((".jsonl", ".json")):
        return err
    return at_source_row(err, err.source, read_table_rows(err.source)[1])


class TableWriter:
    """Stream record batches to one parquet or jsonl file (by suffix). Use as a context manager.

    The file appears at ``uri`` only once closed without an error: locally it is written under a
    temporary name and renamed once on disk (:func:`r2ray.storage.publish`); on an object store
    a failed write's upload is discarded."""

    def __init__(self, uri: str, schema: pa.Schema):
        self.uri, self.schema = str(uri), schema
        self.rows = 0
        fs, path = storage.filesystem(self.uri)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        self._path = path
        self._tmp = storage.temporary_path(path) if storage.is_local(fs) else None
        self._handle = fs.open(self._tmp or path, "wb")
        self._parquet = (pq.ParquetWriter(self._handle, schema, compression="zstd")
                         if path.endswith(".parquet") else None)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        table = table.select(self.schema.names).cast(self.schema)
        self.rows += table.num_rows
        if self._parquet is not None:
            self._parquet.write_table(table)
        else:
            lines = (json.dumps(row, ensure_ascii=False, separators=(",", ":"))
                     for row in table.to_pylist())
            self._handle.write(("\n".join(lines) + "\n").encode("utf-8") if table.num_rows else b"")

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        self._handle.close()
        if self._tmp is not None:
            storage.publish(self._tmp, self._path)

    def abort(self) -> None:
        """Drop what was written: nothing appears at ``uri``."""
        if self._parquet is not None:   # its footer goes to the discarded output
            with contextlib.suppress(Exception):
                self._parquet.close()
        with contextlib.suppress(Exception):
            if self._tmp is None and hasattr(self._handle, "discard"):
                self._handle.discard()   # fsspec buffered files: abort the multipart upload
                self._handle.closed = True   # and never flush what is left on garbage collection
            else:
                self._handle.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def write_table(table: pa.Table, uri: str) -> None:
    with TableWriter(uri, table.schema) as writer:
        writer.write(table)


def iter_batches(uri: str, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Stream a parquet file in record batches (jsonl files are read whole). A file without rows
    yields one empty batch of its columns, so a caller validates them as for any other file;
    a garbled file is a :class:`BenchError`."""
    fs, path = storage.filesystem(uri)
    if not path.endswith(".parquet"):
        table = read_table(uri)
        yield from table.to_batches(max_chunksize=batch_rows) if table.num_rows else [
            pa.RecordBatch.from_pylist([], schema=table.schema)]
        return
    with _readable(uri), fs.open(path, "rb") as handle:
        file = pq.ParquetFile(handle)
        if not file.metadata.num_rows:
            yield pa.RecordBatch.from_pylist([], schema=file.schema_arrow)
        yield from file.iter_batches(batch_size=batch_rows)
