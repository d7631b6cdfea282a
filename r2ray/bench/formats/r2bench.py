"""``r2bench``: the published R2-Bench layout, one CSV per model.

Columns: ``prompts_id``, ``key``, ``original_prompt``, then ``{b}_score`` (judged quality in
[0, 1]) and ``{b}_count`` (output tokens) for the 15 numeric budgets b, and ``unlimited_score`` /
``unlimited_count`` for the default arm. Other columns are ignored.

- model: ``--model`` (one per file, in order), else the file name without ``.csv``;
- query_id: ``key:prompts_id`` (unique whether ``prompts_id`` counts within a task or overall);
  category: ``key`` (taken to name the source task);
- input_tokens: estimated from ``original_prompt`` (:func:`r2ray.prompting.estimate_tokens`);
- a blank score means the arm was not run: no row; a score with a blank count is an error;
- truncated: unknown (the layout does not record whether an answer hit the cap), left empty;
- prices: the layout has none, so they come from ``--catalog`` (default: the default catalogue).
"""

from __future__ import annotations

from r2ray.bench.formats.common import (
    AdapterOptions, Converted, RowCollector, SourcePart, count, is_blank, number, read_csv_strings,
    require_columns, stem, text,
)
from r2ray.bench.schema import bench_error
from r2ray.catalog import DEFAULT_BUDGET
from r2ray.errors import R2RayError
from r2ray.prompting import estimate_tokens

SUFFIXES = (".csv",)
R2BENCH_BUDGETS = (10, 20, 30, 40, 50, 80, 100, 150, 200, 300, 500, 800, 1200, 2000, 4000)
ID_COLUMNS = ["prompts_id", "key", "original_prompt"]
BUDGET_COLUMNS = [(b, f"{b}_score", f"{b}_count") for b in R2BENCH_BUDGETS] + [
    (DEFAULT_BUDGET, "unlimited_score", "unlimited_count")]


def model_names_for(files: list[str], given: list[str] | None) -> list[str]:
    """One model name per file: ``--model`` values in order, else the file names."""
    if given is None:
        return [stem(uri) for uri in files]
    if len(given) != len(files):
        raise R2RayError(f"--model was given {len(given)} time(s) for {len(files)} input file(s) "
                         f"({', '.join(files)}); give it once per file, in order")
    return list(given)


def read(files: list[str], options: AdapterOptions) -> Converted:
    converted = Converted(parts=[])
    for uri, model in zip(files, model_names_for(files, options.model_names)):
        table, replaced = read_csv_strings(uri)
        if replaced:
            converted.notes.append(f"{uri}: {replaced} undecodable byte(s) replaced (not UTF-8)")
        part, unscored = _convert(table, uri, model)
        converted.parts.append(part)
        if unscored:
            converted.notes.append(f"{uri}: {unscored} (prompt, budget) cell(s) with a blank "
                                   "score left out (not run or not graded)")
    return converted


def _convert(table, uri: str, model: str) -> tuple[SourcePart, int]:
    """(the rows, how many (prompt, budget) cells had a blank score and gave none)."""
    require_columns(table, ID_COLUMNS + [c for _, s, n in BUDGET_COLUMNS for c in (s, n)], uri)
    columns = {name: table.column(name).to_pylist()
               for name in ID_COLUMNS + [c for _, s, n in BUDGET_COLUMNS for c in (s, n)]}
    rows, unscored = RowCollector(uri), 0
    for i in range(table.num_rows):
        row = i + 1
        prompt = text(columns["original_prompt"][i], uri, row, "original_prompt")
        key = text(columns["key"][i], uri, row, "key")
        prompt_id = text(columns["prompts_id"][i], uri, row, "prompts_id")
        input_tokens = estimate_tokens(prompt)
        for budget, score_column, count_column in BUDGET_COLUMNS:
            score = columns[score_column][i]
            if is_blank(score):
                unscored += 1
                continue
            quality = number(score, uri, row, score_column, 0.0, 1.0)
            tokens = columns[count_column][i]
            if is_blank(tokens):
                raise bench_error(uri, i, count_column, f"blank, but {score_column} is {score!r}; "
                                  "a scored arm needs its token count")
            rows.add(row, query_id=f"{key}:{prompt_id}", query=prompt, category=key, model=model,
                     budget=budget, input_tokens=input_tokens,
                     output_tokens=count(tokens, uri, row, count_column), quality=quality)
    return rows.part(), unscored
