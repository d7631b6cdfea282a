"""Bench statistics per (model, budget): count, mean quality, mean output tokens, compliance, cost.

:func:`bench_stats` is a pure function over a table. It is built from combinable partial sums
(:func:`partial_sums`, :func:`combine_partials`, :func:`finalise_stats`) so that
:func:`bench_stats_report` can stream a bench of any size file by file, batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from r2ray import storage
from r2ray.bench.io import SUFFIXES, at_file_line, iter_batches
from r2ray.bench.schema import (BenchError, arm_indices, check_unique_across, row_keys,
                                validate_bench)
from r2ray.catalog import DEFAULT_BUDGET, Catalog, budget_label, load_catalog
from r2ray.routing import call_cost_usd

WITHIN_FACTOR_TENTHS = 11  # "within 1.1× budget": 10 × output_tokens ≤ 11 × budget, exact in integers
STATS_SCHEMA = pa.schema([
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),                 # tokens, 0 = default
    pa.field("count", pa.int64()),                  # rows
    pa.field("mean_quality", pa.float64()),
    pa.field("mean_output_tokens", pa.float64()),
    pa.field("share_within_1_1x", pa.float64()),    # null for the default budget
    pa.field("share_truncated", pa.float64()),      # cut by the hard cap; null where unrecorded
    pa.field("mean_cost_usd", pa.float64()),        # null where no row has a known cost
])
_SUMS = ["count", "quality_sum", "tokens_sum", "within_sum", "within_count", "truncated_sum",
         "truncated_count", "cost_sum", "cost_count"]


def catalog_uri_beside(bench_uri: str) -> str:
    """``<bench without suffix>.catalog.yaml``: where a bench's own catalogue is kept."""
    uri = str(bench_uri)
    for suffix in SUFFIXES:
        if uri.endswith(suffix):
            return uri[: -len(suffix)] + ".catalog.yaml"
    return uri + ".catalog.yaml"


def row_cost_usd(table: pa.Table, catalog: Catalog | None) -> np.ndarray:
    """[rows] USD: the recorded ``cost_usd`` where present, else the bill of the prompt sent as
    ĉ prices it (``routing.call_cost_usd``: the query's input tokens plus a budgeted arm's length
    instruction, × p_in, + output × p_out), else NaN (no catalogue, or no such arm in it)."""
    cost = np.full(table.num_rows, np.nan)
    if catalog is not None:
        arm = arm_indices(table, catalog)
        known = arm >= 0
        cost[known] = call_cost_usd(catalog, table.column("input_tokens").to_numpy()[known],
                                    table.column("output_tokens").to_numpy()[known], arm[known])
    if "cost_usd" in table.column_names:
        recorded = table.column("cost_usd").to_numpy(zero_copy_only=False).astype(np.float64)
        cost = np.where(np.isnan(recorded), cost, recorded)
    return cost


def partial_sums(table: pa.Table, catalog: Catalog | None = None) -> pa.Table:
    """Per (model, budget) sums that add up across tables: see :func:`combine_partials`."""
    budget = table.column("budget").to_numpy().astype(np.int64)
    tokens = table.column("output_tokens").to_numpy().astype(np.int64)
    budgeted = budget != DEFAULT_BUDGET
    within = np.where(budgeted, 10 * tokens <= WITHIN_FACTOR_TENTHS * budget, False)
    cost = row_cost_usd(table, catalog)
    truncated = table.column("truncated").cast(pa.int64())
    rows = pa.table({
        "model": table.column("model"), "budget": table.column("budget"),
        "quality": table.column("quality"), "tokens": pa.array(tokens, pa.float64()),
        "within": pa.array(within.astype(np.int64)), "budgeted": pa.array(budgeted.astype(np.int64)),
        "truncated": truncated,
        "cost": pa.array(np.nan_to_num(cost)), "costed": pa.array((~np.isnan(cost)).astype(np.int64)),
    })
    sums = rows.group_by(["model", "budget"]).aggregate([
        ("quality", "count"), ("quality", "sum"), ("tokens", "sum"), ("within", "sum"),
        ("budgeted", "sum"), ("truncated", "sum"), ("truncated", "count"), ("cost", "sum"),
        ("costed", "sum")])
    aggregated = ["quality_count", "quality_sum", "tokens_sum", "within_sum", "budgeted_sum",
                  "truncated_sum", "truncated_count", "cost_sum", "costed_sum"]
    return pa.table({"model": sums.column("model"), "budget": sums.column("budget"),
                     **{name: sums.column(a) for name, a in zip(_SUMS, aggregated)}})


def combine_partials(partials: Iterable[pa.Table]) -> pa.Table:
    table = pa.concat_tables(list(partials))
    sums = table.group_by(["model", "budget"]).aggregate([(name, "sum") for name in _SUMS])
    return pa.table({"model": sums.column("model"), "budget": sums.column("budget"),
                     **{name: sums.column(f"{name}_sum") for name in _SUMS}})


def finalise_stats(sums: pa.Table, catalog: Catalog | None = None) -> pa.Table:
    """Means from sums; rows ordered by catalogue model order (unknown models after, by name),
    then budget ascending with default last."""
    get = lambda name: sums.column(name).to_numpy().astype(np.float64)  # noqa: E731
    count = get("count")
    with np.errstate(invalid="ignore", divide="ignore"):
        within = np.where(get("within_count") > 0, get("within_sum") / get("within_count"), np.nan)
        truncated = np.where(get("truncated_count") > 0,
                             get("truncated_sum") / get("truncated_count"), np.nan)
        cost = np.where(get("cost_count") > 0, get("cost_sum") / get("cost_count"), np.nan)
    table = pa.table({
        "model": sums.column("model"), "budget": sums.column("budget").cast(pa.int32()),
        "count": sums.column("count").cast(pa.int64()),
        "mean_quality": get("quality_sum") / count, "mean_output_tokens": get("tokens_sum") / count,
        "share_within_1_1x": pa.array(within, from_pandas=True),
        "share_truncated": pa.array(truncated, from_pandas=True),
        "mean_cost_usd": pa.array(cost, from_pandas=True),
    }, schema=STATS_SCHEMA)
    return table.take(pa.array(_order(table, catalog), pa.int64()))


def _order(table: pa.Table, catalog: Catalog | None) -> list[int]:
    rank = {name: i for i, name in enumerate(catalog.model_names)} if catalog else {}
    models = table.column("model").to_pylist()
    budgets = table.column("budget").to_pylist()
    key = lambda i: (rank.get(models[i], len(rank)), models[i],  # noqa: E731
                     budgets[i] == DEFAULT_BUDGET, budgets[i])
    return sorted(range(table.num_rows), key=key)


def bench_stats(table: pa.Table, catalog: Catalog | None = None) -> pa.Table:
    """Per (model, budget): count, mean quality, mean output tokens, share of answers within 1.1×
    the budget (null for default), share cut by the hard cap, and mean cost in USD over the rows
    whose cost is known (``cost_usd`` where recorded, else :func:`row_cost_usd`'s catalogue bill;
    null for an arm the catalogue lacks and whose rows record none). Columns as :data:`STATS_SCHEMA`."""
    return finalise_stats(combine_partials([partial_sums(table, catalog)]), catalog)


# ---- the printed report ------------------------------------------------------------------------
def bench_stats_report(uris: str | Iterable[str], catalog_path: str | None = None,
                       batch_rows: int = 1 << 20) -> str:
    """Read a bench (streamed, validated batch by batch) and format its statistics table.

    A (query_id, model, budget) repeated across batches or files is an error, as in
    :func:`r2ray.bench.io.read_bench`: counted twice it would skew every mean. Only those three
    columns of every row are kept to find such repeats."""
    files = storage.list_files(uris, SUFFIXES)
    catalog, catalog_source = catalog_for_bench(files[0], catalog_path)
    partials, keys, rows = [], [], 0
    for index, uri in enumerate(files):
        offset = 0
        for batch in iter_batches(uri, batch_rows):
            table = _valid_batch(batch, uri, offset)
            partials.append(partial_sums(table, catalog))
            keys.append(row_keys(table, index, offset))
            offset += table.num_rows
        rows += offset
    try:
        check_unique_across(keys, files)
    except BenchError as err:
        raise at_file_line(err) from None
    stats = finalise_stats(combine_partials(partials), catalog)
    header = f"bench: {len(files)} file(s), {rows:,} rows; prices: {catalog_source}"
    return "\n".join([header, format_stats(stats), *_notes(stats, catalog_source)])


def _valid_batch(batch: pa.RecordBatch, uri: str, offset: int) -> pa.Table:
    """One batch of ``uri`` from its row ``offset`` (0-based), validated; an error names the
    row's line in a jsonl file, as :func:`r2ray.bench.io.read_bench` does."""
    try:
        return validate_bench(pa.Table.from_batches([batch]), uri, row_offset=offset)
    except BenchError as err:
        raise at_file_line(err) from None


def catalog_for_bench(first_file: str, catalog_path: str | None) -> tuple[Catalog, str]:
    """(catalogue, where from): ``catalog_path``, else ``<bench>.catalog.yaml`` beside the bench
    file if it exists, else the default pool."""
    if catalog_path:
        return load_catalog(catalog_path), catalog_path
    beside = catalog_uri_beside(first_file)
    if storage.exists(beside):
        return load_catalog(beside), beside
    return load_catalog(), "the default catalogue (no catalogue beside the bench)"


def _notes(stats: pa.Table, catalog_source: str) -> list[str]:
    missing = sorted({m for m, c in zip(stats.column("model").to_pylist(),
                                        stats.column("mean_cost_usd").to_pylist()) if c is None})
    if not missing:
        return []
    return [f"note: no prices for {', '.join(missing)} (no such arm in {catalog_source} and no "
            "cost_usd); their cost column is empty — pass --catalog to price them"]


def format_stats(stats: pa.Table) -> str:
    """A fixed-width text table of :func:`bench_stats` output."""
    header = ("model", "budget", "count", "quality", "out_tokens", "within_1.1x", "truncated",
              "cost_usd")
    percent = lambda share: "-" if share is None else f"{100 * share:.1f}%"  # noqa: E731
    lines = []
    for row in stats.to_pylist():
        cost = row["mean_cost_usd"]
        lines.append((row["model"], budget_label(row["budget"]), f"{row['count']:,}",
                      f"{row['mean_quality']:.3f}", f"{row['mean_output_tokens']:.1f}",
                      percent(row["share_within_1_1x"]), percent(row["share_truncated"]),
                      "" if cost is None else f"{cost:.3e}"))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), *map(fmt, lines)])
