"""The scoring pool's shape from the cluster's resources, and the predictor's inference batching:
the knobs that set the batch job's throughput (measured in benchmarks/batch.py, not here)."""

from __future__ import annotations

import logging
import numpy as np
import pytest
import torch

from r2ray.batch.config import route_config
from r2ray.batch.pool import (EMBEDDING_BATCH_ROWS, TEXT_BATCH_ROWS, TEXT_CALLS_IN_FLIGHT,
                              WORKERS_PER_READ_TASK, pool_shape, text_batch_rows)
from r2ray.batch.score import use_threads
from r2ray.predictor.torch_fit import inference_rows, predict_module
from r2ray.errors import ConfigError


def config(**given):
    return route_config(input="in", output="out", model="m", budget_usd=1.0, **given)


@pytest.mark.parametrize("cpus, workers, per_worker, threads", [
    (2, 2, 0.5, 1),       # this machine: both cores, one CPU left for a repartition task
    (16, 16, 0.937, 1),
    (3, 3, 0.666, 1),
    (64, 64, 0.984, 1),
    (1, 1, 0.0, 1),       # less than two: all for the whole-CPU repartition task (0.5 hung)
    (1.5, 1, 0.5, 1),
])
def test_cpu_defaults_put_one_single_threaded_worker_on_each_core(cpus, workers, per_worker,
                                                                   threads):
    pool = pool_shape(config(), {"CPU": cpus}, encodes_text=True)
    assert (pool.workers, pool.threads_per_worker) == (workers, threads)
    assert pool.cpus_per_worker == pytest.approx(per_worker, abs=1e-3)
    assert pool.workers * pool.cpus_per_worker <= cpus - 1 + 1e-9  # room for a repartition


def test_given_settings_win_and_threads_follow_the_cpus_asked_for():
    pool = pool_shape(config(workers=1, batch_size=77), {"CPU": 8}, encodes_text=False)
    assert (pool.workers, pool.batch_size) == (1, 77)
    assert pool.cpus_per_worker == pytest.approx(7)
    assert pool.threads_per_worker == 7
    pool = pool_shape(config(workers=3, cpus_per_worker=2, threads_per_worker=1), {"CPU": 8},
                      encodes_text=True)
    assert (pool.workers, pool.cpus_per_worker, pool.threads_per_worker) == (3, 2, 1)


def test_gpu_workers_one_per_gpu_share_with_at_most_one_core_each():
    pool = pool_shape(config(gpus_per_worker=0.5), {"CPU": 16, "GPU": 2}, encodes_text=True)
    assert (pool.workers, pool.gpus_per_worker, pool.cpus_per_worker) == (4, 0.5, 1.0)
    pool = pool_shape(config(gpus_per_worker=0.3), {"CPU": 8, "GPU": 1}, encodes_text=True)
    assert (pool.workers, pool.cpus_per_worker) == (3, 1.0)                  # 0.9 of the GPU
    pool = pool_shape(config(gpus_per_worker=1), {"CPU": 2, "GPU": 4}, encodes_text=True)
    assert (pool.workers, pool.cpus_per_worker) == (4, 0.25)                 # few CPUs: shared


@pytest.mark.parametrize("share, workers", [(0.2, 5), (0.1, 10), (0.25, 4), (1 / 3, 3)])
def test_gpu_shares_that_fill_a_gpu_exactly_each_get_a_worker(share, workers):
    """1 // 0.2 is 4.0 in floats: five 0.2 shares fit one GPU, and the pool takes all five."""
    pool = pool_shape(config(gpus_per_worker=share), {"CPU": 16, "GPU": 1}, encodes_text=True)
    assert pool.workers == workers


@pytest.mark.parametrize("cpus, workers, threads", [(4, 2, 1), (6, 2, 2), (8, 2, 3), (4, 1, 3)])
def test_derived_threads_never_exceed_the_cpus_a_worker_holds(cpus, workers, threads):
    """Torch threads beyond the logical CPUs an actor holds spin on cores the feeding tasks
    were left (4 CPUs, 2 workers of 1.5: round gave 2 threads each, 4 on the 3 CPUs left)."""
    pool = pool_shape(config(workers=workers), {"CPU": cpus}, encodes_text=True)
    assert pool.threads_per_worker == threads <= max(1.0, pool.cpus_per_worker)


def test_each_node_keeps_a_whole_cpu_for_the_repartition_task(caplog):
    """Two 2-CPU nodes (and a head of none): from the totals, four workers of 0.75 left 0.5 CPUs
    free on each node, so the whole-CPU repartition task ran nowhere and the job hung (a
    ray.cluster_utils.Cluster run); one CPU kept per node leaves some node a whole one."""
    nodes = [{"CPU": 0.0}, {"CPU": 2.0}, {"CPU": 2.0}]
    with caplog.at_level(logging.WARNING, logger="r2ray.batch.pool"):
        pool = pool_shape(config(), {"CPU": 4}, encodes_text=False, nodes=nodes)
        assert caplog.text == ""
        assert (pool.workers, pool.cpus_per_worker) == (4, 0.5)
        pool_shape(config(cpus_per_worker=0.75), {"CPU": 4}, encodes_text=False, nodes=nodes)
    assert "needs 2 beside them (1 per node)" in caplog.text and "at most 0.5 per" in caplog.text


def test_a_cluster_that_reports_no_cpus_is_warned_of(caplog):
    """ray.cluster_resources() has no CPU key where no node has CPUs (a head started with
    --num-cpus=0, workers yet to join): that is no CPUs, not one."""
    with caplog.at_level(logging.WARNING, logger="r2ray.batch.pool"):
        pool = pool_shape(config(), {}, encodes_text=True)
    assert pool.workers == 1 and "the cluster has 0 CPUs now" in caplog.text


@pytest.mark.parametrize("field", ["cpus_per_worker", "gpus_per_worker", "task_cpus",
                                   "spend_guarantee"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_pool_and_plan_settings_are_refused_naming_the_field(field, value):
    """An infinite cpus_per_worker passed validation and then overflowed the thread count; a
    NaN spend guarantee was refused as 'should be less than 1'."""
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
        config(**{field: value})


@pytest.mark.parametrize("given, cluster, named", [
    ({"gpus_per_worker": 1}, {"CPU": 4}, "1 GPUs"),                          # none visible
    ({"gpus_per_worker": 2}, {"CPU": 8, "GPU": 1}, "2 GPUs"),
    ({"workers": 3, "gpus_per_worker": 1}, {"CPU": 16, "GPU": 2}, "3 GPUs"),
    ({"cpus_per_worker": 4}, {"CPU": 2}, "8 CPUs"),
    ({"cpus_per_worker": 1}, {"CPU": 2}, "2 CPUs"),      # two whole-CPU actors on 2: hung
    ({"workers": 1, "cpus_per_worker": 0.5}, {"CPU": 1}, "0.5 CPUs"),
    ({}, {"CPU": 0.5}, "the cluster has 0.5 CPUs"),
])
def test_a_pool_the_cluster_cannot_start_now_is_warned_of_naming_it(given, cluster, named,
                                                                     caplog):
    """Ray Data does not fail on resources the cluster lacks: it waits for them (seen: 2 actors
    × 1 CPU on 2 CPUs, 1 × 0.5 on 1 CPU, 2 × 4 on 2, forever on a fixed cluster), and an
    autoscaler or workers still joining may bring them, so the job warns, naming the setting."""
    with caplog.at_level(logging.WARNING, logger="r2ray.batch.pool"):
        pool_shape(config(**given), cluster, encodes_text=True)
    assert named in caplog.text and "waits until the cluster has them" in caplog.text


def test_a_pool_that_fits_is_not_warned_of_and_no_gpu_visible_is_one_worker(caplog):
    with caplog.at_level(logging.WARNING, logger="r2ray.batch.pool"):
        for cpus in (1, 1.5, 2, 3, 16):
            pool_shape(config(), {"CPU": cpus}, encodes_text=True)
        pool_shape(config(gpus_per_worker=0.5), {"CPU": 16, "GPU": 2}, encodes_text=True)
    assert caplog.text == ""
    # GPU nodes an autoscaler has yet to add: one worker, which waits for them
    assert pool_shape(config(gpus_per_worker=1), {"CPU": 4}, True).workers == 1


def test_rows_per_call_depend_on_what_the_workers_compute():
    assert pool_shape(config(), {"CPU": 2}, encodes_text=True).batch_size == TEXT_BATCH_ROWS
    assert pool_shape(config(), {"CPU": 2}, encodes_text=False).batch_size == EMBEDDING_BATCH_ROWS


def test_text_calls_are_not_queued_behind_a_running_one():
    from r2ray.batch.job import score_pool_options

    for encodes_text, in_flight in ((True, TEXT_CALLS_IN_FLIGHT), (False, 2)):
        pool = pool_shape(config(), {"CPU": 2}, encodes_text, 20_000)
        assert pool.calls_in_flight == in_flight
        compute = score_pool_options(pool)["compute"]
        assert compute.max_tasks_in_flight_per_actor == in_flight
    assert TEXT_CALLS_IN_FLIGHT == 1


@pytest.mark.parametrize("cpus, reads", [(2, 1), (8, 1), (9, 2), (64, 8)])
def test_one_read_task_at_a_time_feeds_up_to_eight_workers(cpus, reads):
    """Each read task running at once is a worker process starting beside the actors: one per
    WORKERS_PER_READ_TASK workers by default, the config's number where given."""
    assert WORKERS_PER_READ_TASK == 8
    assert pool_shape(config(), {"CPU": cpus}, encodes_text=False).read_tasks == reads
    assert pool_shape(config(read_tasks=3), {"CPU": cpus}, encodes_text=False).read_tasks == 3


def test_inference_rows_keep_the_widest_activation_within_the_working_set():
    assert inference_rows(176 * 128) == 64          # the joint network on the default pool
    assert inference_rows(176 * 256) == 32          # the per-arm MLP
    assert inference_rows(10**9) == 8               # never fewer than 8 rows
    assert inference_rows(176 * 128, device="cuda") == 2048
    for width in (1, 100, 5000, 176 * 128):
        rows = inference_rows(width)
        assert rows & (rows - 1) == 0                # a power of two
        assert rows * width * 4 <= 8 << 20 or rows == 8


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"n_arms": 3})()
        self.layer = torch.nn.Linear(5, 6)

    def forward(self, x):
        out = self.layer(x)
        return out[:, :3], out[:, 3:]


def test_predictions_do_not_depend_on_the_inference_batch():
    torch.manual_seed(0)
    module = _Tiny()
    x = np.random.default_rng(1).standard_normal((101, 5)).astype(np.float32)
    whole = predict_module(module, x, "cpu", batch_size=4096)
    for rows in (1, 8, 64):
        for got, want in zip(predict_module(module, x, "cpu", batch_size=rows), whole):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


class _Member:
    threads = 1


def test_use_threads_reaches_the_members_of_a_composite_predictor():
    inner, winner = _Member(), _Member()
    composite = type("Stacked", (), {"members_": [inner], "winner_": winner})()
    use_threads(composite, 4)
    assert inner.threads == winner.threads == 4


@pytest.mark.parametrize("backlog_rows, workers, rows", [
    (None, 2, TEXT_BATCH_ROWS),   # size unknown (jsonl only)
    (1_000, 2, 256),              # small: calls spread over the workers as they start
    (20_000, 2, 1024),            # 20,000 / 16 = 1,250 -> 1,024
    (10_000_000, 16, 2048),       # capped
])
def test_text_calls_are_sized_from_the_backlog(backlog_rows, workers, rows):
    assert text_batch_rows(backlog_rows, workers) == rows
    pool = pool_shape(config(workers=workers), {"CPU": 16}, True, backlog_rows)
    assert pool.batch_size == rows
    assert pool_shape(config(workers=workers, batch_size=77), {"CPU": 16}, True,
                      backlog_rows).batch_size == 77                       # given wins
    assert pool_shape(config(workers=workers), {"CPU": 16}, False,
                      backlog_rows).batch_size == EMBEDDING_BATCH_ROWS     # embeddings: unchanged


def test_planning_counts_parquet_rows_and_not_jsonl(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from r2ray.batch.backlog import plan_units, planned_rows, unit_items

    pq.write_table(pa.table({"query_id": [str(i) for i in range(250)]}),
                   tmp_path / "a.parquet", row_group_size=100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"query_id": "x", "query": "y"}) + "\n")
    units, _ = plan_units(str(tmp_path))
    assert [u.rows for u in units] == [100, 100, 50, None]
    assert planned_rows(units) == 250 and planned_rows(units[3:]) is None
    # readers get it (-1: unknown) to count the rows a failing unit leaves unread
    assert [item["rows"] for item in unit_items(units)] == [100, 100, 50, -1]


def test_encoder_precision_is_a_checked_setting_the_score_workers_load_with(small_routing_model,
                                                                            tmp_path):
    """``--encoder-precision`` (default auto, as Serve's): the workers' text encoder runs at it,
    and a value that is not one of the three names the field."""
    import pyarrow as pa

    from r2ray.batch.job import load_model
    from r2ray.batch.score import ScoreWorker
    from r2ray.bench.synthetic import synth_bench
    from r2ray.predictor import make_predictor, save_predictor
    from r2ray.predictor.data import bench_arrays

    from r2ray.encoders import resolve_precision

    assert config().encoder_precision == "auto"
    with pytest.raises(ConfigError, match="encoder_precision"):
        config(encoder_precision="float16")
    # one precision for the run, resolved on the driver (recorded in the manifest's scoring_pool)
    assert pool_shape(config(), {"CPU": 2}, True).encoder_precision == \
        resolve_precision("auto", "cpu")
    assert pool_shape(config(encoder_precision="float32"), {"CPU": 2}, True).encoder_precision \
        == "float32"
    assert pool_shape(config(gpus_per_worker=1), {"CPU": 2, "GPU": 1}, True) \
        .encoder_precision == "auto"   # each GPU worker resolves it on its GPU
    assert pool_shape(config(), {"CPU": 2}, encodes_text=False).encoder_precision is None
    catalog = small_routing_model["catalog"]
    arrays = bench_arrays(synth_bench(catalog, 120, seed=5), catalog)
    arrays = arrays.with_embedding(np.random.default_rng(5).normal(
        size=(len(arrays.query), 384)).astype(np.float32))
    save_predictor(make_predictor("per_arm_ridge").fit(arrays, catalog), str(tmp_path / "p"),
                   encoder_spec="minilm")
    files = load_model(str(tmp_path / "p"), None, None).files
    texts = ["What is 2 + 2?", "Write a haiku about autumn.", "Prove that 17 is prime."]
    table = pa.table({"query_id": ["a", "b", "c"], "query": texts, "input_tokens": [8, 9, 9],
                      "tenant": [None] * 3, "order": [0, 1, 2]})
    scored, vectors = {}, {}
    for precision in ("float32", "bfloat16"):
        worker = ScoreWorker(files, threads=1, precision=precision)
        assert worker.encoder.precision == precision
        scored[precision] = worker(table)
        vectors[precision] = worker.encoder.encode(texts)
    assert scored["float32"].column("query_id").to_pylist() == ["a", "b", "c"]
    assert scored["float32"].schema == scored["bfloat16"].schema
    assert ((vectors["float32"] * vectors["bfloat16"]).sum(axis=1) > 0.9999).all()
    np.testing.assert_allclose(scored["bfloat16"].column("base_q").to_numpy(),
                               scored["float32"].column("base_q").to_numpy(), atol=0.02)
