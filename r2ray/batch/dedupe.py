"""Repeated query ids: the first row (lowest order key) is routed, every later one quarantined.

The driver finds the repeated ids from the scored blocks' ids and order keys up to
:data:`LOCAL_ROWS` rows, Ray Data's ``groupby().aggregate()`` past it (the driver then only ever
holds the repeated ids); :func:`drop_rows_stage` then quarantines the repeats block by block, each
record keeping its source file, row and raw content. On the driver, the scored ``query_key`` (a
hash of the id) screens the rows first: only rows whose key repeats reach the grouping by id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray import storage
from r2ray.batch.backlog import QUARANTINE_SCHEMA, ROW_BITS, raw_rows
from r2ray.bench.io import write_table


LOCAL_ROWS = 2_000_000
"""Up to this many rows the driver finds repeated ids itself from the materialised blocks (ids and
order keys only: tens of MB at most); past it Ray Data's groupby does, so the driver's memory
stays bounded whatever N. A Ray Data groupby costs seconds of scheduling at any size (18.6 s
for 1,000 rows on a loaded 2-core host); the driver's pass over 200,000 ids takes ~0.1 s."""


def first_seen_duplicates(scored, partitions: int = 4, local_rows: int = LOCAL_ROWS,
                          num_cpus: float = 0.25) -> dict[str, int]:
    """{query_id: lowest order key} for ids that occur more than once in a materialised Dataset:
    on the driver up to ``local_rows`` rows (:func:`repeated_ids`; the projection tasks take
    ``num_cpus``, the job's ``task_cpus``), else with Ray Data's groupby. Empty: none.

    The shuffle moves ids and order keys only, so a few ``partitions`` suffice; it is the sort-based
    pull shuffle, which measured 0.4–1.6 s against 2.4–4.7 s for Ray's default hash shuffle (with
    its aggregator actors) on 200,000 ids on 2 CPUs.
    """
    rows = scored.count()
    if rows == 0:
        return {}
    if rows <= local_rows:
        import ray

        from r2ray.solver.distributed import blocks_in_place

        # this node's blocks read in place, the others projected where they live: no round of
        # tasks (200,000 scored rows in 16 blocks, load 23, side by side: 21.7 s with a
        # projection task per block, 0.10 s in place with the key screen)
        parts = blocks_in_place(scored.to_arrow_refs(), _ids_and_orders, num_cpus=num_cpus)
        return repeated_ids([ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in parts])
    from ray.data.aggregate import Count, Min
    from ray.data.context import ShuffleStrategy
    from ray.data.expressions import col

    context = scored.context  # a Dataset keeps the context it was made with, not the current one
    before, context.shuffle_strategy = context.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        counts = scored.select_columns(["query_id", "order"]).groupby(
            "query_id", num_partitions=partitions).aggregate(
            Count(alias_name="rows"), Min("order", alias_name="first_order"))
        repeated = counts.filter(expr=col("rows") > 1).take_all()
    finally:
        context.shuffle_strategy = before
    return {row["query_id"]: int(row["first_order"]) for row in repeated}


def _ids_and_orders(block: pa.Table) -> pa.Table:
    """The block's ``query_id``, ``order`` and (when scored) ``query_key`` columns."""
    return block.select([c for c in ("query_id", "order", "query_key") if c in block.column_names])


def repeated_ids(tables: list[pa.Table]) -> dict[str, int]:
    """{query_id: lowest order key} for ids that occur more than once in ``tables`` (columns
    ``query_id``, ``order``, optional ``query_key``: equal ids have equal keys, so only rows
    whose key repeats are grouped by id, a sort of 8-byte keys instead of a hash of every id)."""
    if not tables:
        return {}
    table = pa.concat_tables(tables)
    if "query_key" in table.column_names:
        table = table.filter(pa.array(_key_repeats(table.column("query_key").to_numpy())))
    counts = table.group_by("query_id").aggregate([("order", "count"), ("order", "min")])
    repeated = counts.filter(pc.greater(counts.column("order_count"), 1))
    return dict(zip(repeated.column("query_id").to_pylist(),
                    repeated.column("order_min").to_pylist()))


def _key_repeats(keys: np.ndarray) -> np.ndarray:
    """[n] bool: this row's key occurs more than once in ``keys``."""
    ordered = np.sort(keys)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    return np.isin(keys, repeats) if repeats.size else np.zeros(len(keys), dtype=bool)


def is_duplicate(orders: np.ndarray, query_ids: pa.Array, first_seen: dict[str, int]) -> np.ndarray:
    """[n] bool: this row repeats a query_id whose first (lowest-order) row is another row."""
    if not first_seen:
        return np.zeros(len(orders), dtype=bool)
    keys = pa.array(list(first_seen))
    hit = pc.is_in(query_ids, value_set=keys).to_numpy(zero_copy_only=False)
    out = np.zeros(len(orders), dtype=bool)
    for i in np.flatnonzero(hit):
        out[i] = orders[i] != first_seen[query_ids[i].as_py()]
    return out


def duplicate_reason(first_order: int, sources: dict[int, str]) -> str:
    """Why a repeated id is quarantined; ``sources``: input file index → URI."""
    file_index, row = first_order >> ROW_BITS, (first_order & ((1 << ROW_BITS) - 1)) + 1
    return f"duplicate query_id (first seen in {sources[file_index]}, row {row})"


def drop_rows_stage(batch: pa.Table, duplicates: dict[str, int], sources: dict[int, str],
                    quarantine_uri: str) -> pa.Table:
    """Quarantine repeated query ids (all but the lowest-order row) and keep the rest.

    ``sources``: input file index → URI; each record keeps its file, row and raw content.
    """
    orders = batch.column("order").to_numpy()
    repeated = is_duplicate(orders, batch.column("query_id").combine_chunks(), duplicates)
    if repeated.any():
        index = np.flatnonzero(repeated)
        ids = batch.column("query_id").take(pa.array(index)).to_pylist()
        files = orders[index] >> ROW_BITS
        rows = (orders[index] & ((1 << ROW_BITS) - 1)) + 1
        raw = {int(f): raw_rows(sources[int(f)], rows[files == f].tolist())
               for f in np.unique(files)}
        records = [{"source": sources[int(f)], "row": int(r), "query_id": query_id,
                    "reason": duplicate_reason(duplicates[query_id], sources),
                    "raw": raw[int(f)][int(r)]}
                   for f, r, query_id in zip(files, rows, ids)]
        write_table(pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA),
                    storage.join(quarantine_uri, f"part-dup-{int(orders.min()):016x}.parquet"))
    return batch.filter(pa.array(~repeated))
