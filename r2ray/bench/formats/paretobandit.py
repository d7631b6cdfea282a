"""``paretobandit``: ParetoBandit's ``*_k4.jsonl`` (one line per prompt, ``arms`` keyed by model).

- one default-arm row (budget 0) per (prompt, model): ``reward`` -> quality, realised ``cost``
  -> cost_usd, ``source`` -> category; an arm with a null ``reward`` was not judged: no row,
  counted in the summary (an arm without the key is an error: a renamed key would drop the
  model); query_id: ``pb-`` + the first 16 hex digits of the prompt's sha256 (the layout has
  no ids; the same prompt gets the same id in every file); truncated: unknown, left empty;
- prices: ``models_k4.json`` beside the input, else ``--catalog``;
- tokens of ``google/gemini-2.5-flash``: measured, from ``flash_token_counts.jsonl`` beside the
  input, joined on the exact prompt text (its costs equal the arms' costs row for row);
- other tokens: input estimated from the prompt (:func:`r2ray.prompting.estimate_tokens`); output
  backed out of the realised cost, ``round((cost − input × in_price) / out_price)``, clipped at 0
  (the estimate can overshoot a short answer's input cost). Reasoning models' hidden thinking
  tokens are billed as output, so they count here too.
"""

from __future__ import annotations

import hashlib
import posixpath

from r2ray import storage
from r2ray.bench.formats.common import (
    AdapterOptions, Converted, ModelPrice, RowCollector, SourcePart, beside, count, is_blank,
    iter_jsonl, lookup, number, read_json, text,
)
from r2ray.bench.schema import BenchError, bench_error
from r2ray.catalog import DEFAULT_BUDGET
from r2ray.prompting import estimate_tokens

SUFFIXES = (".jsonl",)
PRICE_FILE = "models_k4.json"
MEASURED_FILE = "flash_token_counts.jsonl"
MEASURED_MODEL = "google/gemini-2.5-flash"


def read(files: list[str], options: AdapterOptions) -> Converted:
    converted = Converted(parts=[])
    for uri in files:
        if posixpath.basename(uri) == MEASURED_FILE:  # a side file, when a folder is given
            continue
        prices = source_prices(beside(uri, PRICE_FILE))
        converted.prices.update(prices)
        measured_uri = beside(uri, MEASURED_FILE)
        measured = measured_tokens(measured_uri) if storage.exists(measured_uri) else {}
        part, counts = _convert(uri, prices, measured, options, converted.prices)
        converted.parts.append(part)
        converted.notes.append(
            f"{uri}: {MEASURED_MODEL} tokens measured for {counts['measured']} row(s) "
            f"({MEASURED_FILE}{'' if measured else ' not found'}); output tokens of "
            f"{counts['backed_out']} row(s) backed out of cost, {counts['clipped']} clipped at 0; "
            f"{counts['unjudged']} arm(s) with a null reward left out")
    return converted


def source_prices(uri: str) -> dict[str, ModelPrice]:
    """``models_k4.json`` -> {model_id: price}; empty when the file is absent."""
    if not storage.exists(uri):
        return {}
    data = read_json(uri)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise BenchError(f"{uri}: expected {{'models': [...]}}")
    prices = {}
    for i, spec in enumerate(models, 1):
        if not isinstance(spec, dict):
            raise bench_error(uri, i - 1, "models", f"entry {i} is not an object")
        name = text(lookup(spec, "model_id", uri, i), uri, i, "model_id")
        context = spec.get("context_length")
        prices[name] = ModelPrice(
            number(lookup(spec, "input_cost_per_m", uri, i), uri, i, "input_cost_per_m", 0.0),
            number(lookup(spec, "output_cost_per_m", uri, i), uri, i, "output_cost_per_m", 0.0),
            None if context is None else count(context, uri, i, "context_length"), PRICE_FILE)
    return prices


def measured_tokens(uri: str) -> dict[str, tuple[int, int]]:
    """``flash_token_counts.jsonl`` -> {prompt: (input tokens, output tokens)} for calls that
    succeeded (``ok``); failed calls carry no counts and are left out."""
    measured = {}
    for row, record in iter_jsonl(uri):
        if record.get("ok") is False:
            continue
        prompt = text(lookup(record, "prompt", uri, row), uri, row, "prompt")
        measured[prompt] = tuple(count(lookup(record, name, uri, row), uri, row, name)
                                 for name in ("input_tokens", "output_tokens"))
    return measured


def _price_for(model: str, prices: dict[str, ModelPrice], options: AdapterOptions,
               used: dict[str, ModelPrice], uri: str, row: int) -> ModelPrice:
    """The price to back output tokens out with: the source's, else the catalogue's (recorded in
    ``used`` so the written catalogue carries the same price)."""
    if model in prices:
        return prices[model]
    if model not in used:
        if model not in options.catalog.model_names:
            raise bench_error(
                uri, row - 1, f"arms.{model}", f"no price for model {model!r} to back its output "
                f"tokens out of cost: put {PRICE_FILE} beside the input or pass --catalog listing "
                f"it (the catalogue has: {', '.join(options.catalog.model_names)})")
        spec = options.catalog.model(model)
        origin = "--catalog" if options.catalog_explicit else "default catalogue"
        used[model] = ModelPrice(spec.input_per_m, spec.output_per_m, spec.context, origin)
    return used[model]


def _convert(uri: str, prices: dict[str, ModelPrice], measured: dict[str, tuple[int, int]],
             options: AdapterOptions, used: dict[str, ModelPrice]) -> tuple[SourcePart, dict]:
    rows = RowCollector(uri)
    counts = {"measured": 0, "backed_out": 0, "clipped": 0, "unjudged": 0}
    for row, record in iter_jsonl(uri):
        prompt = text(lookup(record, "prompt", uri, row), uri, row, "prompt")
        category = text(lookup(record, "source", uri, row), uri, row, "source")
        arms = lookup(record, "arms", uri, row)
        if not isinstance(arms, dict):
            raise bench_error(uri, row - 1, "arms",
                              f"expected an object keyed by model, got {arms!r}")
        query_id = "pb-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
        for model, arm in arms.items():
            field = f"arms.{model}"
            if not isinstance(arm, dict):
                raise bench_error(uri, row - 1, field, f"expected an object, got {arm!r}")
            if "reward" not in arm:  # not lookup(): model names hold dots
                raise bench_error(uri, row - 1, field + ".reward", "is missing")
            reward = arm["reward"]
            if is_blank(reward):
                counts["unjudged"] += 1
                continue
            quality = number(reward, uri, row, field + ".reward", 0.0, 1.0)
            cost_usd = number(arm.get("cost"), uri, row, field + ".cost", 0.0)
            if model == MEASURED_MODEL and prompt in measured:
                input_tokens, output_tokens = measured[prompt]
                counts["measured"] += 1
            else:
                input_tokens = estimate_tokens(prompt)
                price = _price_for(model, prices, options, used, uri, row)
                output_tokens = backed_out_tokens(cost_usd, input_tokens, price)
                counts["backed_out"] += 1
                counts["clipped"] += output_tokens == 0
            rows.add(row, query_id=query_id, query=prompt, category=category, model=model,
                     budget=DEFAULT_BUDGET, input_tokens=input_tokens, output_tokens=output_tokens,
                     quality=quality, cost_usd=cost_usd)
    return rows.part(), counts


def backed_out_tokens(cost_usd: float, input_tokens: int, price: ModelPrice) -> int:
    """Output tokens implied by a realised cost (USD), clipped at 0; 0 for a free output price."""
    if price.output_per_m <= 0:
        return 0
    paid_for_output = cost_usd * 1e6 - input_tokens * price.input_per_m
    return max(0, round(paid_for_output / price.output_per_m))
