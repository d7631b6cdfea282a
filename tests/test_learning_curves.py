"""`r2ray evaluate --train-sizes`: AUDC against training queries for every learned method."""

from __future__ import annotations

import json

import numpy as np
import pytest
from predictor_world import OneModelBeliever, planted_arrays, sampled_arrays, small_catalog

from r2ray.errors import R2RayError
from r2ray.evaluation.harness import Split, random_splits
from r2ray.evaluation.learning_curves import learning_curves, parse_sizes
from r2ray.evaluation.run import ModelUnderTest, fresh_predictor, run_evaluation

METHODS = ["per_arm_ridge", "carrot_knn_all"]


@pytest.fixture(scope="module")
def world():
    catalog = small_catalog()
    arrays, _ = planted_arrays(catalog, n_queries=250, dim=16, seed=0, missing_share=0.0)
    return arrays, catalog


def test_parse_sizes():
    assert parse_sizes("500, 250,250,1000") == [250, 500, 1000]
    for bad in ("250,many", "", "5"):
        with pytest.raises(R2RayError, match="--train-sizes"):
            parse_sizes(bad)


def test_sizes_above_the_training_part_are_skipped_with_a_note(world):
    arrays, catalog = world
    splits = random_splits(arrays.n_queries, [0, 1])                   # 200 train / 50 test
    lines = []
    factories = {n: (lambda seed, n=n: fresh_predictor(n, {}, seed)) for n in METHODS}
    block = learning_curves(arrays, catalog, splits, [40, 150, 5000], factories, log=lines.append)
    assert block["sizes"] == [40, 150]
    assert block["skipped"] == [{"size": 5000, "reason": "above the training part of the splits "
                                                         "(200 queries)"}]
    assert any("size 5000 skipped" in line for line in lines)
    assert sum("40 train: per_arm_ridge fitted" in line for line in lines) == 2  # once per split
    for name in METHODS:
        curve = block["methods"][name]
        assert len(curve["audc"]) == len(curve["audc_std"]) == 2 and curve["n_splits"] == [2, 2]
        assert all(0 < a <= 1 for a in curve["audc"])
    # more data helps ridge on a planted linear world
    assert block["methods"]["per_arm_ridge"]["audc"][1] > block["methods"]["per_arm_ridge"]["audc"][0]


def test_metrics_json_and_plots(world, tmp_path):
    arrays, catalog = world
    model = ModelUnderTest("per_arm_ridge", "per_arm_ridge", {})
    metrics = run_evaluation(arrays, catalog, model, seeds=[0], split="random",
                             out_dir=str(tmp_path), methods=METHODS, train_sizes=[50, 100, 900],
                             log=lambda line: None)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["learning_curves"]["sizes"] == [50, 100]
    assert [s["size"] for s in written["learning_curves"]["skipped"]] == [900]
    assert set(written["learning_curves"]["methods"]) == set(METHODS)
    assert "learning_curves" in written["definitions"]
    for name in ("learning_curves.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    quality = written["quality_calibration"]
    assert set(quality["methods"]) == set(METHODS)
    for block in quality["methods"].values():
        assert 0 <= block["ece"] <= 1 and 0 <= block["ece_uncalibrated"] <= 1
        assert 0 < block["audc_uncalibrated"] <= 1
    np.testing.assert_allclose(quality["methods"]["per_arm_ridge"]["audc"],
                               metrics["methods"]["per_arm_ridge"]["audc"])
    assert quality["reliability"]["ece"] == quality["methods"]["per_arm_ridge"]["ece"]


def test_a_method_replay_skips_in_one_split_is_averaged_over_the_splits_that_scored_it():
    """On a sampled bench a learned method none of whose picks a split's test queries were dealt
    is left out of that split (raised KeyError here after every fit); its AUDC per size is the
    mean over the splits that scored it, with their number."""
    catalog = small_catalog()
    arrays = sampled_arrays(catalog, 200, without_model=0, never_dealt=np.arange(150, 200))
    splits = [Split("no model-0", 0, np.arange(150), np.arange(150, 200)),
              Split("model-0", 1, np.arange(50, 200), np.arange(50))]
    block = learning_curves(arrays, catalog, splits, [100],
                            {"zero": lambda seed: OneModelBeliever(catalog, 0)},
                            log=lambda line: None)
    assert block["methods"]["zero"]["n_splits"] == [1]
    assert 0 <= block["methods"]["zero"]["audc"][0] <= 1
