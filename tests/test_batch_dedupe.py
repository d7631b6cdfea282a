"""Repeated query ids: the driver's pass (small N) and Ray Data's groupby (large N) agree."""

from __future__ import annotations

import pyarrow as pa

from r2ray.batch.dedupe import first_seen_duplicates, repeated_ids


def test_repeated_ids_keep_the_lowest_order_of_each_repeated_id_only():
    tables = [pa.table({"query_id": ["a", "b", "c"], "order": [5, 1, 2]}),
              pa.table({"query_id": ["a", "d", "b"], "order": [3, 4, 9]}),
              pa.table({"query_id": pa.array([], pa.string()), "order": pa.array([], pa.int64())})]
    assert repeated_ids(tables) == {"a": 3, "b": 1}
    assert repeated_ids([]) == {}


def test_the_key_screen_finds_the_same_repeats_and_ignores_key_collisions():
    """Equal ids have equal ``query_key``s; equal keys with other ids (a collision) are not
    repeats; the screen gives what grouping every id gives."""
    ids = [f"q{i % 50}" for i in range(130)] + ["x", "y"]
    orders = [(i * 7919) % 1000 for i in range(132)]
    keys = [i % 50 for i in range(130)] + [7, 7]          # "x" and "y" collide with q7's key
    cut = [0, 40, 41, 132]
    tables = [pa.table({"query_id": ids[a:b], "order": orders[a:b],
                        "query_key": pa.array(keys[a:b], pa.uint64())})
              for a, b in zip(cut[:-1], cut[1:])]
    expected = repeated_ids([t.drop_columns(["query_key"]) for t in tables])
    assert repeated_ids(tables) == expected
    assert set(expected) == {f"q{k}" for k in range(50)}
    unique = [pa.table({"query_id": ["a", "b"], "order": [1, 2],
                        "query_key": pa.array([3, 3], pa.uint64())})]
    assert repeated_ids(unique) == {}


def test_the_driver_pass_and_the_groupby_find_the_same_repeats(ray_local):
    import ray

    rows = [{"query_id": f"q{i % 37}", "order": (i * 7919) % 1000, "x": i} for i in range(120)]
    scored = ray.data.from_items(rows, override_num_blocks=5).materialize()
    local = first_seen_duplicates(scored)
    assert local == first_seen_duplicates(scored, local_rows=0)
    assert local == {f"q{k}": min(r["order"] for r in rows if r["query_id"] == f"q{k}")
                     for k in range(37)}
