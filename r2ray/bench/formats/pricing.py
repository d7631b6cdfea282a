"""Prices for the models a converted bench holds, and the catalogue written beside it.

Where prices come from, first match wins: the source itself (a price file shipped with the data);
the ``--catalog`` the user passed; a fit to the realised costs (``cost_usd``) and token counts
of the model's rows; the default catalogue. A model with none of these is an error naming the
file and row where it first appears, listing the catalogue's models.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray import storage
from r2ray.bench.formats.common import AdapterOptions, ModelPrice, SourcePart
from r2ray.bench.schema import bench_error
from r2ray.catalog import DEFAULT_BUDGET, Catalog, budget_label, catalog_from_dict

DEFAULT_CONTEXT_TOKENS = 131_072
"""Context window (tokens) for a model whose source and catalogue say nothing: 128k is the
common window of current API models. Edit the written catalogue if a model's differs."""

MIN_FIT_ROWS = 2


class PriceFit(NamedTuple):
    input_per_m: float        # USD per million input tokens
    output_per_m: float       # USD per million output tokens
    median_rel_error: float   # median |fitted − realised| / realised over rows with cost > 0


def fit_prices(input_tokens: np.ndarray, output_tokens: np.ndarray,
               cost_usd: np.ndarray) -> PriceFit:
    """Non-negative least squares of cost on (input tokens, output tokens), no intercept.

    Two unknowns, so exact by cases: the unconstrained solution if both are ≥ 0, else the better
    of the two one-price fits (the other price 0).
    """
    design = np.column_stack([input_tokens, output_tokens]).astype(np.float64)
    cost = np.asarray(cost_usd, dtype=np.float64)
    candidates = []
    solution = np.linalg.lstsq(design, cost, rcond=None)[0]
    if (solution >= 0).all():
        candidates.append(solution)
    for j in (0, 1):
        column = design[:, j]
        norm = column @ column
        single = np.zeros(2)
        single[j] = max(0.0, column @ cost / norm) if norm > 0 else 0.0
        candidates.append(single)
    best = min(candidates, key=lambda p: float(np.sum((design @ p - cost) ** 2)))
    fitted = design @ best
    positive = cost > 0
    rel = np.abs(fitted[positive] - cost[positive]) / cost[positive]
    return PriceFit(best[0] * 1e6, best[1] * 1e6, float(np.median(rel)) if rel.size else 0.0)


def resolve_prices(bench: pa.Table, parts: list[SourcePart], given: dict[str, ModelPrice],
                   options: AdapterOptions) -> dict[str, ModelPrice]:
    """A price for every model in ``bench`` (see the module docstring for the order)."""
    prices: dict[str, ModelPrice] = {}
    for model in pc.unique(bench.column("model")).to_pylist():
        prices[model] = given.get(model) or _price_elsewhere(model, bench, parts, options)
    return prices


def _price_elsewhere(model: str, bench: pa.Table, parts: list[SourcePart],
                     options: AdapterOptions) -> ModelPrice:
    catalog = options.catalog
    if options.catalog_explicit and model in catalog.model_names:
        return _from_catalog(catalog, model, "--catalog")
    fitted = _fit_model(bench, model)
    if fitted is not None:
        spec_context = catalog.model(model).context if model in catalog.model_names else None
        return ModelPrice(fitted.input_per_m, fitted.output_per_m, spec_context,
                          f"fitted to realised costs (median error {fitted.median_rel_error:.1%})")
    if not options.catalog_explicit and model in catalog.model_names:
        return _from_catalog(catalog, model, "default catalogue")
    source, row = _first_appearance(parts, model)
    raise bench_error(
        source, row - 1, "model",
        f"unknown model {model!r}: the source has no prices and no realised costs to fit them "
        f"from, and the {'--catalog' if options.catalog_explicit else 'default catalogue'} has "
        f"only: {', '.join(catalog.model_names)}. Pass --catalog with a catalogue that lists it.")


def _from_catalog(catalog: Catalog, model: str, origin: str) -> ModelPrice:
    spec = catalog.model(model)
    return ModelPrice(spec.input_per_m, spec.output_per_m, spec.context, origin)


def _fit_model(bench: pa.Table, model: str) -> PriceFit | None:
    if "cost_usd" not in bench.column_names:
        return None
    rows = bench.filter(pc.and_(pc.equal(bench.column("model"), model),
                                pc.is_valid(bench.column("cost_usd"))))
    if rows.num_rows < MIN_FIT_ROWS:
        return None
    return fit_prices(*(rows.column(name).to_numpy()
                        for name in ("input_tokens", "output_tokens", "cost_usd")))


def _first_appearance(parts: list[SourcePart], model: str) -> tuple[str, int]:
    for part in parts:
        hits = np.flatnonzero(pc.equal(part.table.column("model"), model).to_numpy(
            zero_copy_only=False))
        if hits.size:
            return part.source, int(part.source_rows[hits[0]])
    return parts[0].source, 1


# ---- the catalogue of what was found ----------------------------------------------------------
def found_catalog(bench: pa.Table, prices: dict[str, ModelPrice]) -> Catalog:
    """Models in ``bench`` with their prices; ``budgets`` are the budgets the bench holds (a model
    holding fewer lists its own), so a router trained on it offers only arms it has data for."""
    per_model: dict[str, list[int]] = {}
    pairs = bench.select(["model", "budget"]).group_by(["model", "budget"]).aggregate([])
    for item in pairs.to_pylist():
        per_model.setdefault(item["model"], []).append(item["budget"])
    grid = sorted({b for budgets in per_model.values() for b in budgets}, key=default_last)
    models = []
    for name, price in prices.items():
        spec = {"name": name, "input_per_m": round(price.input_per_m, 6),
                "output_per_m": round(price.output_per_m, 6),
                "context": price.context or DEFAULT_CONTEXT_TOKENS}
        own = sorted(per_model[name], key=default_last)
        if own != grid:
            spec["budgets"] = [_yaml_budget(b) for b in own]
        models.append(spec)
    return catalog_from_dict({"budgets": [_yaml_budget(b) for b in grid], "models": models},
                             "the converted bench")


def default_last(budget_tokens: int) -> tuple[bool, int]:
    """Sort key: numeric budgets ascending, the default (0) last, as catalogues list them."""
    return budget_tokens == DEFAULT_BUDGET, budget_tokens


def _yaml_budget(budget_tokens: int) -> int | str:
    return budget_label(budget_tokens) if budget_tokens == DEFAULT_BUDGET else budget_tokens


def write_found_catalog(catalog: Catalog, prices: dict[str, ModelPrice], uri: str) -> None:
    """The catalogue YAML with a header saying where each model's prices and context came from."""
    lines = ["# Catalogue of the models found by `r2ray bench convert`.",
             "# Prices: USD per million tokens. Where they came from:"]
    lines += [f"#   {name}: {price.origin}" for name, price in prices.items()]
    defaulted = [name for name, price in prices.items() if price.context is None]
    if defaulted:
        lines.append(f"# Context unknown in the source, set to {DEFAULT_CONTEXT_TOKENS} tokens "
                     f"(the common window of current API models) for: {', '.join(defaulted)}")
    storage.write_text(uri, "\n".join(lines) + "\n" + catalog.to_yaml())
