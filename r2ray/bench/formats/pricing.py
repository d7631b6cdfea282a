"""Prices for the models a converted bench holds, and the catalogue written beside it.

Where prices come from, first match wins: the source itself (a price file shipped with the data);
the ``--catalog`` the user passed; a fit to the realised costs (``cost_usd``) and token counts
of the model's rows; the default catalogue. A model with none of these is an error naming the
file and row where it first appears, listing the catalogue's models.

The fit is robust: least absolute deviations first, so a few wild costs (a typo, cents for
dollars, a failed call billed as 0) cannot drag it; rows off that fit by more than
:data:`OUTLIER_FACTOR` either way are left out of the final least-squares fit, named in the
summary, and their ``cost_usd`` cleared (readers then price them from the catalogue). A fitted
price above :data:`MAX_PRICE_PER_M` is refused: cost_usd is then in the wrong unit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray import storage
from r2ray.bench.formats.common import AdapterOptions, ModelPrice, SourcePart
from r2ray.bench.schema import BenchError, bench_error
from r2ray.catalog import DEFAULT_BUDGET, Catalog, budget_label, catalog_from_dict

DEFAULT_CONTEXT_TOKENS = 131_072
"""Context window (tokens) for a model whose source and catalogue say nothing: 128k is the
common window of current API models. Edit the written catalogue if a model's differs."""

MIN_FIT_ROWS = 2
OUTLIER_FACTOR = 10.0
"""A realised cost over 10x above or below the robust fit is a slip, not a price: real costs of
one model vary with the token counts, which the fit already accounts for."""
MAX_PRICE_PER_M = 1_000.0
"""USD per million tokens: the dearest API models list a few hundred; beyond 1,000 the costs are
in the wrong unit (cents, per thousand calls) or garbled."""
SCREEN_ROWS = 20_000  # a seeded sample of this many rows is plenty to find the robust fit
_NO_ROWS = np.zeros(0, dtype=np.int64)


class PriceFit(NamedTuple):
    input_per_m: float        # USD per million input tokens
    output_per_m: float       # USD per million output tokens
    median_rel_error: float   # median |fitted − realised| / realised over kept rows with cost > 0
    outliers: np.ndarray      # [rows] bool: off the robust fit by more than OUTLIER_FACTOR


class Pricing(NamedTuple):
    prices: dict[str, ModelPrice]
    bench: pa.Table           # with ``cost_usd`` cleared on the rows the fits left out
    notes: list[str]          # per model with such rows, naming their source rows


def fit_prices(input_tokens: np.ndarray, output_tokens: np.ndarray,
               cost_usd: np.ndarray) -> PriceFit:
    """Non-negative fit of cost on (input tokens, output tokens), no intercept, robust to a
    minority of wild costs (see the module docstring)."""
    design = np.column_stack([input_tokens, output_tokens]).astype(np.float64)
    cost = np.asarray(cost_usd, dtype=np.float64)
    screen = (np.random.default_rng(0).choice(len(cost), SCREEN_ROWS, replace=False)
              if len(cost) > SCREEN_ROWS else slice(None))
    robust = design @ _least_absolute_deviations(design[screen], cost[screen])
    outliers = (cost > OUTLIER_FACTOR * robust) | (robust > OUTLIER_FACTOR * cost)
    design, cost = design[~outliers], cost[~outliers]
    best = _nonnegative_least_squares(design, cost, np.ones(len(cost)))
    positive = cost > 0
    rel = np.abs(design[positive] @ best - cost[positive]) / cost[positive]
    return PriceFit(float(best[0]) * 1e6, float(best[1]) * 1e6,
                    float(np.median(rel)) if rel.size else 0.0, outliers)


def _nonnegative_least_squares(design: np.ndarray, cost: np.ndarray,
                               weights: np.ndarray) -> np.ndarray:
    """Prices ≥ 0 minimising sum(weights × (design @ prices − cost)²), from the 2×2 normal
    equations. Two unknowns, so exact by cases: the unconstrained solution if both are ≥ 0,
    else the better of the two one-price fits (the other price 0)."""
    weighted = (design * weights[:, None]).T
    gram, moment = weighted @ design, weighted @ cost                # [2, 2], [2]
    candidates = []
    solution = np.linalg.lstsq(gram, moment, rcond=None)[0]
    if (solution >= 0).all():
        candidates.append(solution)
    for j in (0, 1):
        single = np.zeros(2)
        single[j] = max(0.0, moment[j] / gram[j, j]) if gram[j, j] > 0 else 0.0
        candidates.append(single)
    return min(candidates, key=lambda p: float(p @ gram @ p - 2 * p @ moment))  # + a constant


def _least_absolute_deviations(design: np.ndarray, cost: np.ndarray,
                               iterations: int = 100) -> np.ndarray:
    """Non-negative LAD by iteratively reweighted least squares, from prices 0 (so the first
    weights are 1/cost: a huge cost starts with little say)."""
    floor = 1e-9 * (float(np.median(np.abs(cost))) or 1.0)  # keeps an exact fit's weights finite
    price = np.zeros(2)
    for _ in range(iterations):
        weights = 1 / np.maximum(np.abs(design @ price - cost), floor)
        price, previous = _nonnegative_least_squares(design, cost, weights), price
        if np.allclose(price, previous, rtol=1e-4, atol=0):  # ample to screen at 10x
            break
    return price


def resolve_prices(bench: pa.Table, parts: list[SourcePart], given: dict[str, ModelPrice],
                   options: AdapterOptions) -> Pricing:
    """A price for every model in ``bench`` (see the module docstring for the order)."""
    prices, notes = {}, []
    cleared = np.zeros(bench.num_rows, dtype=bool)
    for model in pc.unique(bench.column("model")).to_pylist():
        prices[model], outliers = ((given[model], _NO_ROWS) if model in given
                                   else _price_elsewhere(model, bench, parts, options))
        if outliers.size:
            cleared[outliers] = True
            notes.append(_outlier_note(model, outliers, bench, parts))
    if cleared.any():
        column = bench.schema.get_field_index("cost_usd")
        bench = bench.set_column(column, bench.schema.field(column), pc.if_else(
            pa.array(cleared), pa.scalar(None, pa.float64()), bench.column(column)))
    return Pricing(prices, bench, notes)


def _price_elsewhere(model: str, bench: pa.Table, parts: list[SourcePart],
                     options: AdapterOptions) -> tuple[ModelPrice, np.ndarray]:
    """The price and the bench rows its fit left out (none unless fitted)."""
    catalog = options.catalog
    if options.catalog_explicit and model in catalog.model_names:
        return _from_catalog(catalog, model, "--catalog"), _NO_ROWS
    fitted = _fit_model(bench, model)
    if fitted is not None:
        fit, outliers = fitted
        if max(fit.input_per_m, fit.output_per_m) > MAX_PRICE_PER_M:
            raise _row_error(parts, _first_row(bench, model), "cost_usd", (
                f"prices fitted to the costs of {model!r} are implausible: in "
                f"{fit.input_per_m:.3g}, out {fit.output_per_m:.3g} USD per million tokens (over "
                f"{MAX_PRICE_PER_M:g}); cost_usd must be USD per row. Fix its unit, or pass "
                "--catalog with the model's prices."))
        spec_context = catalog.model(model).context if model in catalog.model_names else None
        return ModelPrice(fit.input_per_m, fit.output_per_m, spec_context,
                          f"fitted to realised costs (median error {fit.median_rel_error:.1%})"
                          ), outliers
    if not options.catalog_explicit and model in catalog.model_names:
        return _from_catalog(catalog, model, "default catalogue"), _NO_ROWS
    raise _row_error(
        parts, _first_row(bench, model), "model",
        f"unknown model {model!r}: the source has no prices and no realised costs to fit them "
        f"from, and the {'--catalog' if options.catalog_explicit else 'default catalogue'} has "
        f"only: {', '.join(catalog.model_names)}. Pass --catalog with a catalogue that lists it.")


def _from_catalog(catalog: Catalog, model: str, origin: str) -> ModelPrice:
    spec = catalog.model(model)
    return ModelPrice(spec.input_per_m, spec.output_per_m, spec.context, origin)


def _fit_model(bench: pa.Table, model: str) -> tuple[PriceFit, np.ndarray] | None:
    """The fit to ``model``'s rows with a cost, and the bench rows it left out."""
    if "cost_usd" not in bench.column_names:
        return None
    rows = _rows(pc.and_(pc.equal(bench.column("model"), model),
                         pc.is_valid(bench.column("cost_usd"))))
    if rows.size < MIN_FIT_ROWS:
        return None
    costed = bench.take(rows)
    fit = fit_prices(*(costed.column(name).to_numpy()
                       for name in ("input_tokens", "output_tokens", "cost_usd")))
    return fit, rows[fit.outliers]


def _outlier_note(model: str, rows: np.ndarray, bench: pa.Table, parts: list[SourcePart],
                  shown: int = 3) -> str:
    where = []
    for row in rows[:shown].tolist():
        source, line = _source_row(parts, row)
        where.append(f"{source} row {line} (cost_usd {bench.column('cost_usd')[row].as_py():.3g})")
    more = f" and {rows.size - shown} more" if rows.size > shown else ""
    return (f"{model}: {rows.size} row(s) with a cost_usd more than {OUTLIER_FACTOR:g}x off the "
            f"fitted price, left out of the fit and their cost cleared: {', '.join(where)}{more}")


def check_catalog_budgets(bench: pa.Table, parts: list[SourcePart],
                          options: AdapterOptions) -> None:
    """With ``--catalog``, every row of a model it lists must hold a budget it offers that model:
    a bench arm the user's catalogue lacks would be routed by no one."""
    if not options.catalog_explicit:
        return
    catalog, models = options.catalog, set(pc.unique(bench.column("model")).to_pylist())
    for model in [name for name in catalog.model_names if name in models]:
        offered = catalog.budgets_of(model)
        outside = _rows(pc.and_(pc.equal(bench.column("model"), model), pc.invert(
            pc.is_in(bench.column("budget"), value_set=pa.array(offered, pa.int32())))))
        if outside.size:
            row = int(outside[0])
            raise _row_error(parts, row, "budget", (
                f"budget {budget_label(bench.column('budget')[row].as_py())} is not offered for "
                f"{model!r} by --catalog, which offers: "
                f"{', '.join(budget_label(b) for b in offered)}"))


# ---- bench rows back to source rows ----------------------------------------------------------
def _rows(mask: pa.ChunkedArray) -> np.ndarray:
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _first_row(bench: pa.Table, model: str) -> int:
    return int(_rows(pc.equal(bench.column("model"), model))[0])


def _source_row(parts: list[SourcePart], row: int) -> tuple[str, int]:
    """The source file and its 1-based row of ``bench`` row ``row`` (the parts in order)."""
    for part in parts:
        if row < part.table.num_rows:
            return part.source, int(part.source_rows[row])
        row -= part.table.num_rows
    raise IndexError(row)


def _row_error(parts: list[SourcePart], row: int, field: str, message: str) -> BenchError:
    source, line = _source_row(parts, row)
    return bench_error(source, line - 1, field, message)


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
