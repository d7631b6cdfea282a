"""The evaluation harness on a small synthetic world: splits, every method, metrics.json, curves.png."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from predictor_world import OneModelBeliever, sampled_arrays, small_catalog

from r2ray.bench.synthetic import synth_backlog, synth_bench
from r2ray.catalog import load_catalog
from r2ray.errors import R2RayError
from r2ray.evaluation.harness import (Split, aggregate_methods, aggregate_metrics,
                                      category_splits, evaluate_split, random_splits)
from r2ray.evaluation.summary import format_table, quality_calibration_block
from r2ray.evaluation.run import ModelUnderTest, run_evaluation
from r2ray.predictor import COMPOSITE, PREDICTORS
from r2ray.predictor.data import bench_arrays

N_QUERIES = 300
LEARNED = [n for n in PREDICTORS if n not in COMPOSITE]  # what evaluate runs by default
QUICK = {"r2ray": {"epochs": 3}, "per_arm_mlp": {"epochs": 1, "hidden": [32]},
         "carrot_linear_default": {"max_iter": 20}, "carrot_linear_all": {"max_iter": 20},
         "r2ray_residual": {"epochs": 3, "base_folds": 2}}


@pytest.fixture(scope="module")
def world():
    catalog = load_catalog()
    arrays = bench_arrays(synth_bench(catalog, N_QUERIES, seed=0), catalog,
                          synth_backlog(catalog, N_QUERIES, seed=0, embeddings=True))
    return arrays, catalog


@pytest.fixture(scope="module")
def evaluated(world, tmp_path_factory):
    arrays, catalog = world
    out = tmp_path_factory.mktemp("evaluation")
    model = ModelUnderTest("r2ray", "r2ray", QUICK["r2ray"])
    metrics = run_evaluation(arrays, catalog, model, seeds=[0, 1], split="random",
                             out_dir=str(out), method_settings=QUICK, log=lambda line: None)
    return metrics, out, catalog


def test_metrics_json_names_every_method(evaluated):
    metrics, out, catalog = evaluated
    written = json.loads((out / "metrics.json").read_text())
    expected = set(LEARNED) | {"random", "oracle_default", "oracle_all"} | {
        f"single:{m}" for m in catalog.model_names}
    assert set(written["methods"]) == expected
    for name, m in written["methods"].items():
        for key in ("audc", "qnc", "peak", "cost_ratio_at_95"):
            assert key in m and f"{key}_std" in m, (name, key)
        assert 0.0 <= m["audc"] <= 1.0 and 0.0 <= m["qnc"] <= 1.0
    assert written["split"] == "random" and written["seeds"] == [0, 1]
    assert written["normalisation"]["over"] == sorted(expected - set(LEARNED))  # fixed set
    assert written["model"]["name"] == "r2ray" and "re-fitted" in written["model"]["how_evaluated"]
    assert written["registered"] == {"skipped": "the model URI names settings only, no fitted weights"}
    assert written["baseline_settings"]["per_arm_mlp"] == QUICK["per_arm_mlp"]
    assert [s["n_test"] for s in written["splits"]] == [60, 60]


def test_curves_png_is_written(evaluated):
    _, out, _ = evaluated
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_oracles_and_learned_methods_rank_sensibly(evaluated):
    methods = evaluated[0]["methods"]
    for name, m in methods.items():
        assert m["peak"] <= methods["oracle_all"]["peak"] + 1e-12, name
    # on the same arms, knowing the truth beats every learned guess; every learned method beats random
    assert methods["oracle_all"]["audc"] > max(methods[n]["audc"] for n in LEARNED)
    assert min(methods[n]["audc"] for n in LEARNED) > methods["random"]["audc"]
    assert methods["oracle_all"]["qnc"] <= methods["oracle_default"]["qnc"]


def test_budget_adherence_of_every_learned_method(evaluated):
    written = json.loads((evaluated[1] / "metrics.json").read_text())
    adherence = written["budget_adherence"]
    assert set(adherence) == set(LEARNED) | {"oracle_all"}
    for name, block in adherence.items():
        assert [level["fraction"] for level in block["levels"]] == [0.25, 0.5, 0.75, 1.0]
        budgets = [level["budget_usd_per_query"] for level in block["levels"]]
        assert budgets == sorted(budgets) and budgets[0] > 0, name
        # worst over the levels every split could meet (default-arm methods miss the low ones)
        met = [lv["realised_spend_ratio"] for lv in block["levels"] if lv["feasible_splits"] == 2]
        assert block["worst_realised_spend_ratio"] == (max(met) if met else None), name
    # the truth is billed what it planned, and never more than the budget
    for level in adherence["oracle_all"]["levels"]:
        assert level["feasible_splits"] == 2
        assert level["realised_spend_ratio"] == pytest.approx(level["predicted_spend_ratio"])
    assert adherence["oracle_all"]["worst_realised_spend_ratio_any_split"] <= 1.0
    assert "spend/B max" in format_table(evaluated[0])


def test_table_lists_every_method(evaluated):
    metrics = evaluated[0]
    table = format_table(metrics)
    for name in metrics["methods"]:
        assert name in table
    assert "r2ray vs best default-arm baseline" in table


def test_random_splits_are_80_20_and_disjoint():
    splits = random_splits(100, [0, 1])
    for split in splits:
        assert len(split.test) == 20 and len(split.train) == 80
        assert not set(split.train) & set(split.test)
    assert splits[0].test.tolist() != splits[1].test.tolist()


def test_category_splits_leave_one_category_out():
    categories = np.array(["a", "b", "a", "c", "b"])
    splits = category_splits(categories)
    assert [s.label for s in splits] == ["category a", "category b", "category c"]
    assert splits[0].test.tolist() == [0, 2] and splits[0].train.tolist() == [1, 3, 4]
    with pytest.raises(R2RayError, match="at least two categories"):
        category_splits(np.array(["a", "a"]))
    with pytest.raises(R2RayError, match="without one"):
        category_splits(np.array(["a", "", "b"]))


def test_category_split_runs_with_fast_methods(world, tmp_path):
    arrays, catalog = world
    model = ModelUnderTest("per_arm_ridge", "per_arm_ridge", {})
    metrics = run_evaluation(arrays, catalog, model, seeds=[0], split="category",
                             out_dir=str(tmp_path), methods=["carrot_knn_default"],
                             log=lambda line: None)
    n_categories = len(set(arrays.category.tolist()))
    assert len(metrics["splits"]) == n_categories
    assert sum(s["n_test"] + s["n_test_dropped_missing_default_arm"]
               for s in metrics["splits"]) == N_QUERIES
    assert metrics["methods"]["per_arm_ridge"]["audc_std"] is not None


def test_aggregation_rules_by_hand():
    per_split = [{"audc": 0.5, "cost": 1.0, "ratio": {"b": 2.0, "c": 1.0}},
                 {"audc": 0.7, "cost": None, "ratio": {"b": float("inf"), "c": 3.0}}]
    got = aggregate_metrics(per_split)
    assert got["audc"] == pytest.approx(0.6) and got["audc_std"] == pytest.approx(np.std([.5, .7], ddof=1))
    assert got["cost"] is None and got["cost_std"] is None         # not reached in one split
    assert got["ratio"]["b"] == float("inf") and got["ratio_std"]["b"] is None
    assert got["ratio"]["c"] == pytest.approx(2.0)
    assert aggregate_metrics(per_split[:1])["audc_std"] is None    # one split: no std


def test_a_method_replay_skipped_in_one_split_is_averaged_over_the_splits_that_scored_it():
    # A sampled bench: the second split's test queries were never dealt model a's default arm, so
    # replay leaves single:a out there, and r's cost ratio against it exists in the first only
    # (this raised KeyError: 'single:a' after every method had been fitted).
    first = {"r": {"audc": 0.6, "ratio": {"single:a": 2.0, "single:b": 1.0}},
             "single:a": {"audc": 0.3, "ratio": {"r": 0.5, "single:b": 0.5}},
             "single:b": {"audc": 0.4, "ratio": {"r": 1.0, "single:a": 2.0}}}
    second = {"r": {"audc": 0.8, "ratio": {"single:b": 3.0}},
              "single:b": {"audc": 0.2, "ratio": {"r": 1 / 3}}}
    got = aggregate_methods([SimpleNamespace(summary={"methods": m}) for m in (first, second)])
    assert got["r"]["ratio"] == pytest.approx({"single:a": 2.0, "single:b": 2.0})
    assert got["r"]["ratio_std"]["single:a"] is None                # one split scored it
    assert got["r"]["ratio_std"]["single:b"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert got["single:a"]["audc"] == pytest.approx(0.3)
    assert [got[n]["n_splits"] for n in ("r", "single:a", "single:b")] == [2, 1, 2]


def test_a_learned_method_replay_skips_in_one_split_has_no_quality_outcome_there():
    # Its picks (model 0's arms) were dealt to none of the first split's test queries: replay
    # leaves it out of that split's results, and its AUDC with raw q̂ then failed the evaluation
    # (no deferral curve from no points); the quality block averages it over the other split.
    catalog = small_catalog()
    arrays = sampled_arrays(catalog, 200, without_model=0, never_dealt=np.arange(150, 200))
    splits = [Split("no model-0", 0, np.arange(150), np.arange(150, 200)),
              Split("model-0", 1, np.arange(50, 200), np.arange(50))]
    factories = {"zero": lambda seed: OneModelBeliever(catalog, 0)}
    outcomes = [evaluate_split(arrays, catalog, s, factories, log=lambda line: None)
                for s in splits]
    assert "zero" not in outcomes[0].quality and "zero" in outcomes[1].quality
    block = quality_calibration_block(outcomes, "zero")
    assert block["methods"]["zero"]["audc"] == pytest.approx(outcomes[1].quality["zero"]["audc"])


def test_the_table_says_what_its_plus_minus_is():
    """The printed table's ``±`` is the sample std over splits (``aggregate_metrics``); the table
    said so nowhere, so a reader could take it for a standard error or an interval."""
    from predictor_world import planted_arrays

    from r2ray.evaluation.metrics import lambda_grid
    from r2ray.evaluation.summary import metrics_document

    catalog = small_catalog()
    arrays, _ = planted_arrays(catalog, n_queries=100, dim=8, seed=0, missing_share=0.0)
    factories = {"zero": lambda seed: OneModelBeliever(catalog, 0)}
    outcomes = [evaluate_split(arrays, catalog, s, factories, log=lambda line: None)
                for s in random_splits(arrays.n_queries, [0, 1, 2])]
    metrics = metrics_document(outcomes, ModelUnderTest("zero", "zero", {}), "random", [0, 1, 2],
                               lambda_grid(), {}, {})
    table = format_table(metrics)
    std = metrics["methods"]["zero"]["audc_std"]
    assert std == pytest.approx(np.std([o.summary["methods"]["zero"]["audc"] for o in outcomes],
                                       ddof=1))
    assert f"± {std:.3f}" in table
    assert "mean ± sample std (ddof 1) over the 3 splits" in table
    assert "± sample std" not in format_table(metrics_document(
        outcomes[:1], ModelUnderTest("zero", "zero", {}), "random", [0], lambda_grid(), {}, {}))


def test_every_split_of_a_bench_is_scored_one_way_decided_on_the_whole_bench():
    """Half the queries have every arm, half were dealt one (two benches read as one): the bench
    is not sampled, so every split scores its full queries by full information. Decided per
    test part, split B (a quarter full) was scored by replay over all its queries while split A
    dropped its dealt ones, the means mixed the two, and budget_adherence_block raised KeyError
    (split A had adherence rows, B none) after every fit."""
    from dataclasses import replace

    from predictor_world import planted_arrays

    from r2ray.evaluation.learning_curves import learning_curves
    from r2ray.evaluation.method_scores import evaluable_queries, score_predictions
    from r2ray.evaluation.metrics import lambda_grid
    from r2ray.evaluation.summary import metrics_document

    catalog = small_catalog()
    full, _ = planted_arrays(catalog, 200, dim=8, seed=0, missing_share=0.0)
    dealt = sampled_arrays(catalog, 200, without_model=1, never_dealt=np.array([], dtype=int))
    first_half = (np.arange(200) < 100)[:, None]
    arrays = replace(full, **{name: np.where(first_half, getattr(full, name), getattr(dealt, name))
                              for name in ("quality", "output_tokens", "cost_usd")})
    test_a = np.r_[0:30, 100:110]    # three quarters full
    test_b = np.r_[30:40, 110:140]   # a quarter full
    splits = [Split(label, seed, np.setdiff1d(np.arange(200), test), test)
              for label, seed, test in (("A", 0, test_a), ("B", 1, test_b))]
    factories = {"zero": lambda seed: OneModelBeliever(catalog, 0)}
    outcomes = [evaluate_split(arrays, catalog, s, factories, log=lambda line: None)
                for s in splits]
    assert [(o.n_test, o.n_dropped) for o in outcomes] == [(30, 10), (10, 30)]
    by_hand = []
    for split in splits:   # its full queries alone: full information whatever decides it
        test = arrays.subset(split.test[split.test < 100])
        assert len(evaluable_queries(test, catalog)) == test.n_queries
        by_hand.append(score_predictions({"zero": OneModelBeliever(catalog, 0).predict(
            test.embedding)}, test, catalog)["zero"]["audc"])
    assert [o.summary["methods"]["zero"]["audc"] for o in outcomes] == pytest.approx(by_hand)
    metrics = metrics_document(outcomes, ModelUnderTest("zero", "zero", {}), "random", [0, 1],
                               lambda_grid(), {}, {})
    assert set(metrics["budget_adherence"]) == {"zero", "oracle_all"}
    curves = learning_curves(arrays, catalog, splits, [50], factories, log=lambda line: None)
    assert curves["methods"]["zero"]["audc"] == pytest.approx([np.mean(by_hand)])
