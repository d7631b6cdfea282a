"""A bench collected with k arms per query (`r2ray bench collect --arms K`) is scored by replay:
each method picks among every arm it can use, and only the queries whose pick was dealt count.
The estimate must agree with full information, and `r2ray train` / `r2ray evaluate` must run on
such a bench (they refused it: "no test query has every default arm")."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from predictor_world import planted_arrays, planted_bench_table, small_catalog
from r2ray.bench.io import write_table
from r2ray.cli import main
from r2ray.evaluation.method_scores import evaluable_queries, evaluate_methods, is_sampled
from r2ray.evaluation.metrics import deferral_points
from r2ray.execution.collect import assign_arms
from r2ray.predictor.base import ArmPredictions


def dealt(arrays, k: int, seed: int = 0):
    """``arrays`` with only k arms per query kept, dealt as `bench collect --arms k` deals them."""
    keep = np.zeros(arrays.quality.shape, dtype=bool)
    for i, arms in enumerate(assign_arms(arrays.n_queries, arrays.quality.shape[1], k, seed)):
        keep[i, arms] = True
    nan = np.float32(np.nan)
    return replace(arrays, quality=np.where(keep, arrays.quality, nan),
                   output_tokens=np.where(keep, arrays.output_tokens, nan),
                   cost_usd=np.where(keep, arrays.cost_usd, np.nan))


def test_replay_counts_only_the_queries_whose_pick_was_dealt():
    beliefs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])      # picks arm 0, 0, 1 at λ = 0
    cost = np.ones((3, 2))
    true_q = np.array([[1.0, np.nan], [np.nan, 0.0], [np.nan, 0.5]])
    true_c = np.array([[2.0, np.nan], [np.nan, 9.0], [np.nan, 4.0]])
    costs, quality = deferral_points(beliefs, cost, true_q, true_c, np.array([0.0]), replay=True)
    assert costs[0] == pytest.approx(3.0) and quality[0] == pytest.approx(0.75)   # rows 0 and 2
    # full information would restrict the picks to the dealt arms instead: row 1 → arm 1
    costs, quality = deferral_points(beliefs, cost, true_q, true_c, np.array([0.0]))
    assert costs[0] == pytest.approx(5.0) and quality[0] == pytest.approx(0.5)
    # no pick dealt at all: no point (NaN), not a guess
    costs, _ = deferral_points(np.array([[0.1, 0.9], [0.9, 0.1]]), cost[:2], true_q[:2],
                               true_c[:2], np.array([0.0]), replay=True)
    assert np.isnan(costs[0])


def test_replay_agrees_with_full_information():
    catalog = small_catalog()                                     # 3 models × 4 budgets
    full, truth = planted_arrays(catalog, n_queries=6000, seed=3, missing_share=0.0)
    sampled = dealt(full, k=4)
    assert not is_sampled(full, catalog) and is_sampled(sampled, catalog)
    assert len(evaluable_queries(sampled, catalog)) == sampled.n_queries
    learned = {"truth": ArmPredictions(truth, np.nan_to_num(full.output_tokens))}
    lambdas = np.array([0.0, 3e2, 1e3, 3e3, 1e4, 1e9])
    exact = evaluate_methods(full, catalog, learned, lambdas)
    replayed = evaluate_methods(sampled, catalog, learned, lambdas)
    for name in ("truth", "single:model-0", "single:model-2", "random"):
        a, b = exact[name], replayed[name]
        # ~2,000 dealt queries per pick: binomial quality SE ≤ 0.011, so 0.05 is > 4 SE
        assert b.points_quality == pytest.approx(a.points_quality, abs=0.05), name
        assert b.points_cost_usd == pytest.approx(a.points_cost_usd, rel=0.1), name


@pytest.fixture(scope="module")
def sampled_bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampled")
    catalog = small_catalog()
    bench, queries = planted_bench_table(catalog, n_queries=300, seed=5)
    ids = sorted(set(bench.column("query_id").to_pylist()), key=lambda q: int(q[1:]))
    arm_index = {(a.model, a.budget_tokens): j for j, a in enumerate(catalog.arms)}
    keep_arms = dict(zip(ids, map(set, assign_arms(len(ids), catalog.n_arms, 4, seed=0))))
    keep = [arm_index[(m, b)] in keep_arms[q] for q, m, b in zip(
        bench.column("query_id").to_pylist(), bench.column("model").to_pylist(),
        bench.column("budget").to_pylist())]
    bench = bench.filter(pa.array(keep))
    assert bench.num_rows == 300 * 4
    write_table(bench, str(folder / "bench.parquet"))
    write_table(queries, str(folder / "queries.parquet"))
    (folder / "bench.catalog.yaml").write_text(catalog.to_yaml())
    return folder


def test_train_and_evaluate_on_a_sampled_bench(sampled_bench, tmp_path, capsys):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", "--bench", str(sampled_bench / "bench.parquet"), "--queries",
                 str(sampled_bench / "queries.parquet"), "--register", "sampled",
                 "--candidates", "per_arm_ridge,carrot_knn_all", "--tracking-uri", tracking]) == 0
    printed = capsys.readouterr().out
    assert "per_arm_ridge" in printed and "carrot_knn_all" in printed   # the CV table
    out = tmp_path / "eval"
    assert main(["evaluate", "--bench", str(sampled_bench / "bench.parquet"), "--queries",
                 str(sampled_bench / "queries.parquet"), "--model", "models:/sampled/1",
                 "--out", str(out), "--seeds", "2", "--methods", "per_arm_ridge",
                 "--tracking-uri", tracking]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    audc = metrics["methods"]["per_arm_ridge"]["audc"]
    assert np.isfinite(audc) and 0 < audc <= 1
