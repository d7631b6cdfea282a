"""Adapters from published bench layouts to the long format, one module per format.

``ADAPTERS`` maps the format name (``r2ray bench convert --format NAME``) to its reader and the
file suffixes it takes. Every reader returns rows per source file; :func:`convert_files`
validates them (errors name the source file, row and field), prices the models found, and writes
the bench and its catalogue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pyarrow.compute as pc

from r2ray import storage
from r2ray.bench.formats import long, paretobandit, r2bench, routerarena, routerbench
from r2ray.bench.formats.common import AdapterOptions, Converted, ModelPrice, validate_parts
from r2ray.bench.formats.pricing import (
    check_catalog_budgets, default_last, found_catalog, resolve_prices, write_found_catalog,
)
from r2ray.bench.io import check_apart, check_output_name, refuse_folder, write_table
from r2ray.catalog import budget_label, load_catalog
from r2ray.errors import R2RayError


class Adapter(NamedTuple):
    read: Callable[[list[str], AdapterOptions], Converted]
    suffixes: tuple[str, ...]


ADAPTERS: dict[str, Adapter] = {
    "long": Adapter(long.read, long.SUFFIXES),
    "r2bench": Adapter(r2bench.read, r2bench.SUFFIXES),
    "routerbench": Adapter(routerbench.read, routerbench.SUFFIXES),
    "paretobandit": Adapter(paretobandit.read, paretobandit.SUFFIXES),
    "routerarena": Adapter(routerarena.read, routerarena.SUFFIXES),
}


def default_catalog_out(out: str) -> str:
    """``.../bench.parquet`` -> ``.../bench.catalog.yaml`` (where ``bench stats`` looks)."""
    from r2ray.bench.stats import catalog_uri_beside

    return catalog_uri_beside(out)


def convert_files(format: str, inputs: list[str], *, out: str, catalog_out: str | None = None,
                  model_names: list[str] | None = None, catalog_path: str | None = None) -> str:
    """Convert ``inputs`` in ``format`` to a long-format bench at ``out`` (.parquet or .jsonl) and
    the catalogue of its models at ``catalog_out``; returns a summary (rows, queries, models,
    files written, where prices came from, what was estimated)."""
    if format not in ADAPTERS:
        raise R2RayError(f"unknown bench format {format!r}; known: {', '.join(ADAPTERS)}")
    check_output_name(out, "--out")
    if model_names is not None and format != "r2bench":
        raise R2RayError("--model applies to --format r2bench only (other formats name models "
                         "in the data or the file name)")
    adapter = ADAPTERS[format]
    files = storage.list_files(inputs, adapter.suffixes)
    catalog_out = catalog_out or default_catalog_out(out)
    refuse_folder(catalog_out, "--catalog-out")
    check_apart([("--out", out), ("--catalog-out", catalog_out)],
                [("input", f) for f in files] + ([("--catalog", catalog_path)] if catalog_path
                                                 else []))
    options = AdapterOptions(catalog=load_catalog(catalog_path),
                             catalog_explicit=catalog_path is not None, model_names=model_names)
    converted = adapter.read(files, options)
    bench = validate_parts(converted.parts)
    check_catalog_budgets(bench, converted.parts, options)
    prices, bench, fit_notes = resolve_prices(bench, converted.parts, converted.prices, options)
    catalog = found_catalog(bench, prices)
    write_table(bench, out)
    write_found_catalog(catalog, prices, catalog_out)
    return _summary(format, bench, prices, [out, catalog_out], converted.notes + fit_notes)


def _summary(format: str, bench, prices: dict[str, ModelPrice], written: list[str],
             notes: list[str]) -> str:
    budgets = sorted(set(bench.column("budget").to_pylist()), key=default_last)
    queries = pc.count_distinct(bench.column("query_id")).as_py()
    lines = [f"{format}: {bench.num_rows} rows, {queries} queries, {len(prices)} models, "
             f"{len(budgets)} budget(s) ({', '.join(budget_label(b) for b in budgets)}) "
             f"-> {', '.join(written)}"]
    lines += [f"  prices of {name}: in {p.input_per_m:g}, out {p.output_per_m:g} USD/M tokens "
              f"({p.origin})" for name, p in prices.items()]
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines)
