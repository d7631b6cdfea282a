"""``routerbench``: RouterBench-style wide tables (parquet, csv or jsonl), one row per prompt.

Columns: ``sample_id``, ``prompt``, ``eval_name``, and per model ``<model>`` (correctness in
[0, 1], or a boolean: ``True``/``False`` in a CSV), ``<model>|model_response`` and
``<model>|total_cost`` (USD). Models are found from the ``|model_response`` / ``|total_cost``
columns; other columns are ignored.

- default arm only (budget 0); category: ``eval_name``; truncated: unknown, left empty;
- input tokens estimated from the prompt, output tokens from the response
  (:func:`r2ray.prompting.estimate_tokens`);
- blanks are missing, not zero: a blank correctness means no row for that (query, model); a
  blank cost leaves ``cost_usd`` empty; a correctness with a blank response is an error (its
  output tokens cannot be counted);
- prices: ``--catalog`` if it lists the model, else fitted to ``total_cost`` and the token counts.
"""

from __future__ import annotations

from r2ray.bench.formats.common import (
    AdapterOptions, Converted, RowCollector, SourcePart, identifier, is_blank, number,
    read_csv_strings, require_columns, text,
)
from r2ray.bench.io import read_table_rows
from r2ray.bench.schema import bench_error
from r2ray.catalog import DEFAULT_BUDGET
from r2ray.prompting import estimate_tokens

SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
RESPONSE, COST = "|model_response", "|total_cost"
ID_COLUMNS = ["sample_id", "prompt", "eval_name"]


def read(files: list[str], options: AdapterOptions) -> Converted:
    converted = Converted(parts=[])
    for uri in files:
        if uri.endswith(".csv"):
            table, replaced = read_csv_strings(uri)
            source_rows = range(1, table.num_rows + 1)   # records after the header
            if replaced:
                converted.notes.append(f"{uri}: {replaced} undecodable byte(s) replaced")
        else:
            table, source_rows = read_table_rows(uri)
        part, unscored = _convert(table, uri, source_rows)
        converted.parts.append(part)
        if unscored:
            converted.notes.append(f"{uri}: {unscored} (prompt, model) cell(s) with a blank "
                                   "correctness left out (not run or not graded)")
    return converted


def models_in(column_names: list[str]) -> list[str]:
    """Model names, in column order, from ``<model>|model_response`` / ``<model>|total_cost``."""
    models: list[str] = []
    for name in column_names:
        for suffix in (RESPONSE, COST):
            if name.endswith(suffix) and name[: -len(suffix)] not in models:
                models.append(name[: -len(suffix)])
    return models


def _convert(table, uri: str, source_rows) -> tuple[SourcePart, int]:
    """(the rows, how many (prompt, model) cells had a blank correctness and gave none);
    ``source_rows`` [rows]: the 1-based source row (CSV record, jsonl line) of each table row."""
    models = models_in(table.column_names)
    if not models:
        raise bench_error(uri, None, "<model>|model_response",
                          "missing column(s): no `<model>|model_response` columns, so no models")
    needed = ID_COLUMNS + [c for m in models for c in (m, m + RESPONSE, m + COST)]
    require_columns(table, needed, uri)
    columns = {name: table.column(name).to_pylist() for name in needed}
    rows, unscored = RowCollector(uri), 0
    for i, row in enumerate(map(int, source_rows)):
        prompt = text(columns["prompt"][i], uri, row, "prompt")
        sample_id, category = columns["sample_id"][i], columns["eval_name"][i]
        if is_blank(sample_id):
            raise bench_error(uri, row - 1, "sample_id", "is blank; every prompt needs an id")
        query_id = identifier(sample_id, uri, row, "sample_id")
        for model in models:
            correct = columns[model][i]
            if is_blank(correct):
                unscored += 1
                continue
            response = columns[model + RESPONSE][i]
            if is_blank(response):
                raise bench_error(uri, row - 1, model + RESPONSE, f"blank, but {model!r} has a "
                                  "correctness; its output tokens cannot be counted")
            cost = columns[model + COST][i]
            rows.add(row, query_id=query_id, query=prompt,
                     category=None if is_blank(category) else str(category), model=model,
                     budget=DEFAULT_BUDGET, input_tokens=estimate_tokens(prompt),
                     output_tokens=estimate_tokens(str(response)),
                     quality=number(_as_number(correct), uri, row, model, 0.0, 1.0),
                     response=str(response),
                     cost_usd=None if is_blank(cost) else number(cost, uri, row, model + COST, 0.0))
    return rows.part(), unscored


BOOLEAN_TEXT = {"true": 1.0, "false": 0.0}


def _as_number(value):
    """Correctness may be stored as a boolean: a parquet or JSON bool, or in a CSV the text
    ``True``/``False`` (pandas writes a bool column so), any case."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return BOOLEAN_TEXT.get(value.strip().lower(), value)
    return value
