"""``routerarena``: RouterArena's cached results, ``<model>.jsonl`` per model, ``cost.json`` beside.

Default arm (budget 0), one row per line: ``global_index`` -> query_id, ``question`` -> query,
category: the dataset, ``global_index`` up to its first ``_`` (``MMLUPro_history_12`` ->
``MMLUPro``); ``token_usage`` -> tokens; ``evaluation_result.score`` -> quality;
``inference_cost`` -> cost_usd; truncated: unknown, left empty. Values may be JSON numbers or numeric strings. Lines with
``success: false`` carry no answer and are left out (counted in the summary).

``meteor_score`` is a similarity that RouterArena's variant can push slightly below 0 (one
answer in the shipped data scores -0.033); such scores are clipped into [0, 1] and counted. Any
other score outside [0, 1] is an error.

Hard-cap view: for each numeric budget b the catalogue offers the model, the answer cut at b tokens
(:func:`r2ray.bench.answers.cut_text`, consistent with the source's token count), re-judged
(:func:`r2ray.bench.answers.capped_quality`); output_tokens = min(count, b), truncated when cut,
cost_usd = input tokens × input price + min(count, b) × output price.
"""

from __future__ import annotations

from typing import NamedTuple

from r2ray import storage
from r2ray.bench import answers
from r2ray.bench.formats.common import (
    AdapterOptions, Converted, ModelPrice, RowCollector, SourcePart, any_text, beside, count,
    identifier, iter_jsonl, lookup, number, read_json, stem, text,
)
from r2ray.bench.formats.pricing import resolve_prices
from r2ray.bench.schema import BenchError, bench_error
from r2ray.catalog import DEFAULT_BUDGET

SUFFIXES = (".jsonl",)
PRICE_FILE = "cost.json"
CLIPPED_METRICS = ("meteor_score",)


class Answer(NamedTuple):
    row: int                 # source line
    query_id: str
    query: str
    category: str
    input_tokens: int
    output_tokens: int
    text: str                # the generated answer
    score: float             # judged quality in [0, 1]
    metric: str
    ground_truth: str
    cost_usd: float


def read(files: list[str], options: AdapterOptions) -> Converted:
    catalog = options.catalog
    converted = Converted(parts=[])
    for uri in files:
        model = stem(uri)
        offered = catalog.budgets_of(model) if model in catalog.model_names else catalog.budgets
        grid = [b for b in offered if b != DEFAULT_BUDGET]
        found, counts = parse_answers(uri, model)
        if not found:
            raise BenchError(f"{uri}: no answers (the file is empty or every call failed)")
        default = _default_rows(uri, model, found)
        prices = source_prices(beside(uri, PRICE_FILE))
        pricing = resolve_prices(default.table, [default], prices, options)
        price = converted.prices[model] = pricing.prices[model]
        default.table = pricing.bench  # wild costs cleared
        converted.parts += [default, _capped_rows(uri, model, found, price, grid)]
        converted.notes += [_note(uri, found, counts, grid), *pricing.notes]
    return converted


def source_prices(uri: str) -> dict[str, ModelPrice]:
    """``cost.json`` -> {model: price}; empty when the file is absent."""
    if not storage.exists(uri):
        return {}
    data = read_json(uri)
    if not isinstance(data, dict):
        raise BenchError(f"{uri}: expected an object keyed by model name")
    prices = {}
    for i, (name, spec) in enumerate(data.items(), 1):
        field = f"{name}.input_token_price_per_million"
        if not isinstance(spec, dict):
            raise bench_error(uri, None, name, f"expected an object of prices, got {spec!r}")
        prices[name] = ModelPrice(
            number(lookup(spec, "input_token_price_per_million", uri, i), uri, i, field, 0.0),
            number(lookup(spec, "output_token_price_per_million", uri, i), uri, i,
                   f"{name}.output_token_price_per_million", 0.0),
            None, PRICE_FILE)
    return prices


def parse_answers(uri: str, model: str) -> tuple[list[Answer], dict[str, int]]:
    found, counts = [], {"failed": 0, "clipped": 0}
    for row, record in iter_jsonl(uri):
        selected = record.get("llm_selected")
        if selected is not None and selected != model:
            raise bench_error(uri, row - 1, "llm_selected", f"{selected!r} is not the model the "
                              f"file is named for ({model!r}); one file per model")
        if record.get("success") is False:
            counts["failed"] += 1
            continue
        answer, clipped = _parse_one(record, uri, row)
        counts["clipped"] += clipped
        found.append(answer)
    return found, counts


def _parse_one(record: dict, uri: str, row: int) -> tuple[Answer, bool]:
    def get(path: str):
        return lookup(record, path, uri, row)

    metric = text(get("evaluation_result.metric"), uri, row, "evaluation_result.metric")
    if metric not in answers.JUDGES:
        raise bench_error(uri, row - 1, "evaluation_result.metric", f"unknown metric {metric!r}; "
                          f"known: {', '.join(answers.JUDGES)}")
    score = number(get("evaluation_result.score"), uri, row, "evaluation_result.score")
    clipped = metric in CLIPPED_METRICS and not 0.0 <= score <= 1.0
    score = min(1.0, max(0.0, score)) if clipped else score
    number(score, uri, row, "evaluation_result.score", 0.0, 1.0)  # any other metric: in [0, 1]
    query_id = identifier(get("global_index"), uri, row, "global_index")
    answer = Answer(
        row=row, query_id=query_id, query=text(get("question"), uri, row, "question"),
        category=query_id.split("_", 1)[0],
        input_tokens=count(get("token_usage.input_tokens"), uri, row, "token_usage.input_tokens"),
        output_tokens=count(get("token_usage.output_tokens"), uri, row,
                            "token_usage.output_tokens"),
        text=any_text(get("generated_answer"), uri, row, "generated_answer"), score=score,
        metric=metric, ground_truth=any_text(get("evaluation_result.ground_truth"), uri, row,
                                             "evaluation_result.ground_truth"),
        cost_usd=number(get("evaluation_result.inference_cost"), uri, row,
                        "evaluation_result.inference_cost", 0.0))
    return answer, clipped


def _default_rows(uri: str, model: str, found: list[Answer]) -> SourcePart:
    rows = RowCollector(uri)
    for a in found:
        rows.add(a.row, query_id=a.query_id, query=a.query, category=a.category, model=model,
                 budget=DEFAULT_BUDGET, input_tokens=a.input_tokens, output_tokens=a.output_tokens,
                 quality=a.score, response=a.text, cost_usd=a.cost_usd)
    return rows.part()


def _capped_rows(uri: str, model: str, found: list[Answer], price: ModelPrice,
                 grid: list[int]) -> SourcePart:
    """The hard-cap view: per answer, one row per numeric budget."""
    rows = RowCollector(uri)
    for a in found:
        for budget in grid:
            kept, cut = answers.cut_text(a.text, a.output_tokens, budget)
            output_tokens = min(a.output_tokens, budget)
            rows.add(a.row, query_id=a.query_id, query=a.query, category=a.category, model=model,
                     budget=budget, input_tokens=a.input_tokens, output_tokens=output_tokens,
                     quality=answers.capped_quality(a.text, kept, a.ground_truth, a.metric,
                                                    a.score),
                     truncated=cut, response=kept,
                     cost_usd=(a.input_tokens * price.input_per_m
                               + output_tokens * price.output_per_m) * 1e-6)
    return rows.part()


def _note(uri: str, found: list[Answer], counts: dict[str, int], grid: list[int]) -> str:
    judged = [a for a in found if a.metric in answers.RUNNABLE_LOCALLY]
    agree = sum(abs(answers.judge(answers.extract_answer(a.text, a.metric), a.ground_truth,
                                  a.metric) - a.score) < 1e-6 for a in judged)
    return (f"{uri}: {len(found)} answers, {len(grid)} hard-cap budgets; local judge agrees with "
            f"the source score on {agree}/{len(judged)} uncut answers it can judge; "
            f"{counts['clipped']} meteor score(s) clipped into [0, 1]; "
            f"{counts['failed']} failed call(s) left out")
