"""The one battery every registry entry passes: shapes, coverage, masks, save/load, errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from predictor_world import planted_arrays, small_catalog

from r2ray.encoders import EncoderError
from r2ray.predictor import (
    PREDICTORS, ArmPredictions, PredictorError, PredictorVersionWarning, load_predictor,
    make_predictor, save_predictor)
from r2ray.predictor.base import default_arm_mask
from r2ray.predictor.persist import CONFIG_FILE
from r2ray.prompting import instruction_tokens_estimate

FAST = {"r2ray": {"epochs": 4}, "per_arm_mlp": {"epochs": 3, "hidden": [32, 16, 8]},
        "selected": {"candidates": "per_arm_ridge,carrot_knn_all,stacked"},
        "averaged": {"members": [{"kind": "per_arm_ridge"}, {"kind": "carrot_knn_all"},
                                 {"kind": "r2ray", "settings": {"epochs": 4}}]}}
DEFAULT_ONLY = {"carrot_knn_default", "carrot_linear_default"}


@pytest.fixture(scope="module")
def catalog():
    return small_catalog()


@pytest.fixture(scope="module")
def world(catalog):
    train, _ = planted_arrays(catalog, n_queries=400, dim=16, seed=0)
    test, _ = planted_arrays(catalog, n_queries=50, dim=16, seed=9)
    return train, test


@pytest.fixture(scope="module")
def fitted(world, catalog):
    train, _ = world
    return {name: make_predictor(name, **FAST.get(name, {})).fit(train, catalog)
            for name in PREDICTORS}


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_predictions_cover_the_right_arms_with_valid_values(name, fitted, world, catalog):
    _, test = world
    predictor = fitted[name]
    assert predictor.name == name
    prediction = predictor.predict(test.embedding)
    k = catalog.n_arms
    assert prediction.quality.shape == prediction.output_tokens.shape == (50, k)
    assert prediction.quality.dtype == prediction.output_tokens.dtype == np.float32
    covered = default_arm_mask(catalog) if name in DEFAULT_ONLY else np.ones(k, bool)
    assert not np.isnan(prediction.quality[:, covered]).any()
    assert np.isnan(prediction.quality[:, ~covered]).all()
    assert np.isnan(prediction.output_tokens[:, ~covered]).all()
    q = prediction.quality[:, covered]
    assert (q >= 0).all() and (q <= 1).all()
    assert (prediction.output_tokens[:, covered] >= 0).all()
    cost = prediction.cost_usd(catalog, test.input_tokens)
    prices = catalog.arm_arrays
    sent = (test.input_tokens[:, None]                 # the prompt sent: + its instruction
            + instruction_tokens_estimate(prices["budget_tokens"])[None, :])
    expected = sent * prices["price_in_usd"] + prediction.output_tokens * prices["price_out_usd"]
    np.testing.assert_allclose(cost, expected)


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_save_load_round_trip_gives_identical_predictions(name, fitted, world, tmp_path):
    _, test = world
    predictor = fitted[name]
    save_predictor(predictor, str(tmp_path / name), encoder_spec="minilm")
    document = json.loads((tmp_path / name / CONFIG_FILE).read_text())
    assert document["kind"] == name and document["encoder"] == "minilm"
    assert document["data_fingerprint"] == predictor.data_fingerprint_
    assert "models:" in document["catalog_yaml"]
    loaded = load_predictor(str(tmp_path / name))
    assert loaded.name == name and loaded.catalog_ == predictor.catalog_
    assert loaded.encoder_spec == "minilm"
    before, after = predictor.predict(test.embedding), loaded.predict(test.embedding)
    np.testing.assert_array_equal(before.quality, after.quality)
    np.testing.assert_array_equal(before.output_tokens, after.output_tokens)


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_a_loaded_predictor_saved_again_is_the_same_document(name, fitted, tmp_path):
    """Its fingerprint (``document_sha256``, which cost corrections are matched by) survives a
    load and a save: the networks' fit record (epochs, precision, seconds) was dropped on load,
    so r2ray, per_arm_mlp and an average with a network member became another document."""
    first = save_predictor(fitted[name], str(tmp_path / "first"))
    save_predictor(load_predictor(first), str(tmp_path / "again"))
    documents = [json.loads((tmp_path / folder / CONFIG_FILE).read_text())
                 for folder in ("first", "again")]
    assert documents[1]["state"] == documents[0]["state"]
    assert documents[1]["document_sha256"] == documents[0]["document_sha256"]


def test_saved_files_hold_no_pickles(fitted, tmp_path):
    save_predictor(fitted["r2ray"], str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictor.json", "tensors.safetensors"]
    assert b"\x80\x04" not in (tmp_path / "tensors.safetensors").read_bytes()[:64]  # no pickle header


def test_damaged_saved_folders_are_refused_naming_the_file(fitted, world, catalog, tmp_path):
    """A truncated tensors file, a flipped bit, another predictor's weights (which loaded and
    predicted other numbers silently), a cut-short document and a missing tensors file: each a
    PredictorError naming the file, from load_predictor and from the batch job's read_saved."""
    from r2ray.predictor.persist import TENSORS_FILE, read_saved

    good = save_predictor(fitted["per_arm_ridge"], str(tmp_path / "good"))
    other = make_predictor("per_arm_ridge", alpha=50.0).fit(world[0], catalog)  # same shapes
    save_predictor(other, str(tmp_path / "other"))
    tensors = (tmp_path / "good" / TENSORS_FILE).read_bytes()
    flipped = bytearray(tensors)
    flipped[-3] ^= 0x40
    damage = {"cut": (TENSORS_FILE, tensors[: len(tensors) // 2]),
              "flipped": (TENSORS_FILE, bytes(flipped)),
              "swapped": (TENSORS_FILE, (tmp_path / "other" / TENSORS_FILE).read_bytes()),
              "document": (CONFIG_FILE, (tmp_path / "good" / CONFIG_FILE).read_bytes()[:500])}
    for case, (name, data) in damage.items():
        folder = tmp_path / case
        shutil.copytree(good, folder)
        (folder / name).write_bytes(data)
        for load in (load_predictor, read_saved):
            with pytest.raises(PredictorError, match=re.escape(str(folder / name))):
                load(str(folder))
    (tmp_path / "good" / TENSORS_FILE).unlink()
    with pytest.raises(PredictorError, match=f"no {TENSORS_FILE}"):
        load_predictor(good)


def test_an_edited_document_is_refused_naming_the_file(fitted, tmp_path):
    """A field a save writes removed (was a bare KeyError naming nothing), and a catalog_yaml that
    is not the saved one (models reordered: it loaded and labelled model-0's predictions as
    model-2's): each a PredictorError naming predictor.json, from load_predictor and read_saved."""
    import yaml

    from r2ray.predictor.persist import read_saved, saved_catalog

    def batch_load(folder: str):   # the batch job's driver: read_saved, then saved_catalog
        return saved_catalog(read_saved(folder)[0], folder)

    good = save_predictor(fitted["per_arm_ridge"], str(tmp_path / "good"))
    document = json.loads((tmp_path / "good" / CONFIG_FILE).read_text())
    reordered = yaml.safe_load(document["catalog_yaml"])
    reordered["models"].reverse()
    settings_gone = document | {"state": {k: v for k, v in document["state"].items()
                                          if k != "settings"}}
    edits = {"no kind": ({k: v for k, v in document.items() if k != "kind"}, "lacks kind"),
             "no settings": (settings_gone, "lacks state.settings"),
             "list state": (document | {"state": []}, "lacks an object as state"),
             "catalogue": (document | {"catalog_yaml": yaml.safe_dump(reordered)},
                           "catalog_yaml is not the catalogue the predictor was saved with")}
    for case, (edited, message) in edits.items():
        folder = tmp_path / case
        shutil.copytree(good, folder)
        (folder / CONFIG_FILE).write_text(json.dumps(edited))
        for load in (load_predictor, batch_load):
            with pytest.raises(PredictorError, match=re.escape(f"{folder / CONFIG_FILE}") + ".*"
                               + re.escape(message)):
                load(str(folder))


def test_an_edited_calibration_or_setting_is_refused_naming_the_file(fitted, world, tmp_path):
    """Before the fix only tensors.safetensors was hashed: token_calibration's smearing tripled
    in predictor.json loaded silently and moved the mean t̂ from 55 to 141 tokens. Every field
    a prediction depends on is now under document_sha256; a re-indented copy or another
    r2ray_version stamp still loads, predicting the same."""
    from r2ray.predictor.persist import read_saved

    good = save_predictor(fitted["per_arm_ridge"], str(tmp_path / "good"))
    document = json.loads((tmp_path / "good" / CONFIG_FILE).read_text())
    state = document["state"]
    tripled = [[3 * v for v in row] for row in state["token_calibration"]["smearing"]]
    knots = state["quality_calibration"]["knots_y"]
    edits = {"smearing": state | {"token_calibration": state["token_calibration"]
                                  | {"smearing": tripled}},
             "quality knots": state | {"quality_calibration": state["quality_calibration"]
                                       | {"knots_y": [[0.9] * len(row) for row in knots]}},
             "settings": state | {"settings": {"alpha": 50.0}},
             "spend simulation": {k: v for k, v in state.items() if k != "spend_simulation"}}
    cases = {case: document | {"state": edited} for case, edited in edits.items()}
    cases["no tensors hash"] = {k: v for k, v in document.items() if k != "tensors_sha256"}
    for case, edited in cases.items():
        folder = tmp_path / case
        shutil.copytree(good, folder)
        (folder / CONFIG_FILE).write_text(json.dumps(edited))
        for load in (load_predictor, read_saved):
            with pytest.raises(PredictorError, match=re.escape(f"{folder / CONFIG_FILE}: its "
                                                               "fields are not the ones")):
                load(str(folder))
    (tmp_path / "good" / CONFIG_FILE).write_text(json.dumps(
        document | {"saved_at": "2020-01-01T00:00:00+00:00"}, indent=7))
    np.testing.assert_array_equal(load_predictor(good).predict(world[1].embedding).output_tokens,
                                  fitted["per_arm_ridge"].predict(world[1].embedding).output_tokens)


def test_a_document_saved_before_its_digest_loads_with_a_warning(fitted, world, tmp_path):
    from r2ray.predictor.persist import document_digest

    save_predictor(fitted["per_arm_ridge"], str(tmp_path))
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert document["document_sha256"] == document_digest(document)
    del document["document_sha256"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.warns(PredictorVersionWarning, match=re.escape(
            f"{tmp_path / CONFIG_FILE} records no document_sha256")):
        loaded = load_predictor(str(tmp_path))
    np.testing.assert_array_equal(loaded.predict(world[1].embedding).quality,
                                  fitted["per_arm_ridge"].predict(world[1].embedding).quality)
    assert loaded.saved_fingerprint_ == document_digest(document)   # its corrections' key


def test_the_batch_driver_ships_the_document_it_checked(fitted, tmp_path, monkeypatch):
    """Before the fix read_saved parsed predictor.json, then read the file again for the
    workers: a save landing in between (here: the same tensors, other quality calibration)
    reached the workers while the driver planned with, and recorded, the first document."""
    from r2ray import storage
    from r2ray.predictor.persist import document_digest, read_saved

    good = save_predictor(fitted["per_arm_ridge"], str(tmp_path))
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    knots = document["state"]["quality_calibration"]["knots_y"]
    resaved = document | {"state": document["state"] | {"quality_calibration": document["state"][
        "quality_calibration"] | {"knots_y": [[0.9] * len(row) for row in knots]}}}
    resaved["document_sha256"] = document_digest(resaved)
    read_text = storage.read_text

    def read_then_resave(uri: str, *args, **kwargs) -> str:
        text = read_text(uri, *args, **kwargs)
        (tmp_path / CONFIG_FILE).write_text(json.dumps(resaved))
        return text

    monkeypatch.setattr(storage, "read_text", read_then_resave)
    checked, files = read_saved(good)
    assert checked == document and json.loads(files[CONFIG_FILE]) == checked


def test_loading_warns_on_other_version_or_other_data(fitted, tmp_path):
    save_predictor(fitted["per_arm_ridge"], str(tmp_path))
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document | {"r2ray_version": "0.0.1"}))
    with pytest.warns(PredictorVersionWarning, match="0.0.1"):
        load_predictor(str(tmp_path))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.warns(PredictorVersionWarning, match="other data"):
        load_predictor(str(tmp_path), expected_data_fingerprint="f" * 64)


def test_wrong_embedding_dimension_at_predict_is_clear(fitted):
    with pytest.raises(EncoderError, match="dimension 5 does not match the predictor's 16"):
        fitted["r2ray"].predict(np.zeros((2, 5), np.float32))


def test_usage_errors_say_how_to_fix(world, catalog):
    train, _ = world
    with pytest.raises(PredictorError, match="unknown predictor 'nope'.*r2ray"):
        make_predictor("nope")
    with pytest.raises(PredictorError, match="bad settings"):
        make_predictor("per_arm_ridge", epochs=3)
    with pytest.raises(PredictorError, match="call fit"):
        make_predictor("per_arm_ridge").predict(np.zeros((1, 16)))
    no_embedding = train.subset(np.arange(10))
    no_embedding = type(no_embedding)(**{**no_embedding.__dict__, "embedding": None})
    with pytest.raises(PredictorError, match="no query embeddings"):
        make_predictor("per_arm_ridge").fit(no_embedding, catalog)



@pytest.mark.parametrize("name", ["r2ray", "per_arm_mlp", "r2ray_residual"])
def test_a_network_on_two_queries_says_it_needs_three(world, catalog, name):
    """Was "cannot split 1 queries into two parts; the bench needs at least 2" (a BenchError),
    from `r2ray evaluate` on a bench of 3 queries: the calibrations' cross-fitting leaves one."""
    with pytest.raises(PredictorError, match="without a validation set it needs at least 3 "
                                             "training queries"):
        make_predictor(name, epochs=2).fit(world[0].subset(np.arange(2)), catalog)
    three = make_predictor(name, epochs=2).fit(world[0].subset(np.arange(3)), catalog)
    assert np.isfinite(three.predict(world[1].embedding).quality).all()


@pytest.mark.parametrize("name, settings, message", [
    ("per_arm_ridge", {"alpha": "nan"}, "setting alpha='nan': input should be a valid number"),
    ("per_arm_ridge", {"alpha": float("nan")}, "setting alpha=nan: input should be a finite num"),
    ("r2ray", {"steps": 2.5}, "setting steps=2.5: input should be a valid integer"),
    ("carrot_knn_all", {"k": "many"}, "setting k='many': input should be a valid integer"),
    ("r2ray", {"epochs": True}, "setting epochs=True: input should be a valid integer"),
])
def test_a_setting_of_the_wrong_kind_is_refused_before_the_fit(world, catalog, name, settings,
                                                                message):
    """`--set alpha=nan` (not JSON, so kept as text) was a numpy ufunc traceback in the fit."""
    with pytest.raises(PredictorError, match=re.escape(message)):
        make_predictor(name, **settings).fit(world[0], catalog)


# every setting of every predictor, out of range: each was accepted by make_predictor, then fitted
# to a meaningless model (alpha=-1, k=0: all-NaN q̂, steps=0, threads=0: torch's count, lr=0),
# or crashed part-way into the fit with a library's message (ZeroDivisionError, "negative
# dimension", "range() arg 3 must not be zero", "Expected positive integer total_steps")
OUT_OF_RANGE = [
    ("per_arm_ridge", "alpha", -1, "greater than 0"), ("per_arm_ridge", "alpha", 0, "greater than 0"),
    ("carrot_knn_all", "k", 0, "greater than 0"), ("carrot_knn_all", "k", -3, "greater than 0"),
    ("carrot_knn_all", "chunk_queries", 0, "greater than 0"),
    ("carrot_knn_all", "arms", "some", "'default' or 'all'"),
    ("carrot_linear_all", "l2", -1, "greater than or equal to 0"),
    ("carrot_linear_all", "alpha", -1, "greater than 0"),
    ("carrot_linear_all", "max_iter", 0, "greater than 0"),
    ("carrot_linear_all", "threads", 0, "greater than 0"),
    ("r2ray", "dropout", 1.5, "less than 1"), ("r2ray", "dropout", -0.1, "greater than or equal"),
    ("r2ray", "epochs", 0, "greater than 0"), ("r2ray", "steps", -5, "greater than 0"),
    ("r2ray", "batch_size", 0, "greater than 0"), ("r2ray", "learning_rate", 0, "greater than 0"),
    ("r2ray", "weight_decay", -1, "greater than or equal to 0"),
    ("r2ray", "patience", -1, "greater than 0"), ("r2ray", "token_weight", -1, "greater than or"),
    ("r2ray", "validation_fraction", 1.5, "less than 1"),
    ("r2ray", "validation_fraction", 0, "greater than 0"),
    ("r2ray", "seed", -1, "greater than or equal to 0"), ("r2ray", "threads", -1, "greater than 0"),
    ("r2ray", "time_limit_s", -1, "greater than 0"), ("r2ray", "time_limit_s", "soon", "a valid number"),
    ("r2ray", "query_hidden", 0, "greater than 0"), ("r2ray", "joint_hidden", -4, "greater than 0"),
    ("r2ray", "head_hidden", -1, "greater than or equal to 0"),
    ("r2ray", "rank", -1, "greater than or equal to 0"),
    ("r2ray", "model_embedding_dim", 0, "greater than 0"),
    ("r2ray", "budget_embedding_dim", 0, "greater than 0"),
    ("r2ray", "monotone", "sideways", "'none', 'budgets' or 'budgets+default'"),
    ("r2ray", "precision", "fp3", "'auto', 'float32' or 'bfloat16'"),
    ("r2ray", "device", 3, "a valid string"),
    ("per_arm_mlp", "hidden", [64, 0], "greater than 0"), ("per_arm_mlp", "hidden", 32, "a valid list"),
    ("per_arm_mlp", "dropout", 1.0, "less than 1"), ("per_arm_mlp", "epochs", 0, "greater than 0"),
    ("r2ray_residual", "alpha", -1, "greater than 0"),
    ("r2ray_residual", "base_folds", 1, "greater than or equal to 2"),
    ("r2ray_residual", "knn", -1, "greater than or equal to 0"),
    ("r2ray_residual", "members", -1, "greater than or equal to 0"),
    ("stacked", "folds", 1, "greater than or equal to 2"),
    ("stacked", "seed", -1, "greater than or equal to 0"),
    ("averaged", "members", 3, "a valid list"),
    ("selected", "folds", 0, "greater than or equal to 2"),
]


@pytest.mark.parametrize("name, key, value, message", OUT_OF_RANGE)
def test_a_setting_out_of_range_is_refused_naming_it_before_any_fit(name, key, value, message):
    with pytest.raises(PredictorError, match=re.escape(f"predictor {name!r}: setting {key}="
                                                       f"{value!r}: input should be {message}")):
        make_predictor(name, **{key: value})


def test_settings_in_range_are_taken_as_numpy_or_json_gives_them():
    assert make_predictor("carrot_knn_all", k=np.int64(3)).k == 3
    assert make_predictor("per_arm_ridge", alpha=np.float32(0.5)).alpha == 0.5
    assert make_predictor("per_arm_ridge", alpha=2).alpha == 2            # JSON "2": an int
    assert make_predictor("per_arm_mlp", hidden=[8, 4], threads=None).hidden == [8, 4]
    assert make_predictor("r2ray", epochs=None, monotone="budgets").monotone == "budgets"


def test_every_setting_of_every_predictor_has_its_range():
    """A new number or choice setting gets a rule in SETTING_RULES (or --set takes any value)."""
    import inspect

    from r2ray.predictor.kinds import SETTING_RULES

    free = {"device", "candidates", "members", "overrides"}   # text, or checked where used
    for name, factory in PREDICTORS.items():
        for key in inspect.signature(factory).parameters:
            assert key in SETTING_RULES or key in free, (name, key)


def test_a_composite_member_setting_out_of_range_names_the_member(world, catalog):
    members = [{"kind": "per_arm_ridge", "settings": {"alpha": -1}}, {"kind": "carrot_knn_all"}]
    with pytest.raises(PredictorError, match="'per_arm_ridge': setting alpha=-1: input should be "
                                             "greater than 0"):
        make_predictor("stacked", members=members).fit(world[0], catalog)


def test_a_per_arm_mlp_without_hidden_layers_is_a_linear_head(world, catalog):
    """``hidden=[]`` fitted, then crashed sizing its predict batches (max() of no widths)."""
    fitted = make_predictor("per_arm_mlp", hidden=[], epochs=2).fit(world[0], catalog)
    assert np.isfinite(fitted.predict(world[1].embedding).quality).all()


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_arms_missing_from_the_data_are_masked_not_learned_as_zero(name, world, catalog):
    """Missing cells are left out of the loss: the zero placeholders do not drag predictions of a
    half-observed arm to 0. An arm never observed: the joint network still predicts it (through
    the model and budget it shares with other arms); per-arm methods say NaN (no data, no head)."""
    train, test = world
    quality, tokens = train.quality.copy(), train.output_tokens.copy()
    hidden_arm = 1                                         # model-0 at budget 100: never observed
    quality[:, hidden_arm] = tokens[:, hidden_arm] = np.nan
    half = np.arange(train.n_queries) % 2 == 0             # model-0 at budget 20: half missing
    quality[half, 0] = tokens[half, 0] = np.nan
    masked = type(train)(**{**train.__dict__, "quality": quality, "output_tokens": tokens})
    prediction = make_predictor(name, **FAST.get(name, {})).fit(masked, catalog).predict(
        test.embedding)
    if name in ("r2ray", "averaged"):   # the joint network, alone or as the average's member
        assert np.isfinite(prediction.quality[:, hidden_arm]).all()
    else:
        assert np.isnan(prediction.quality[:, hidden_arm]).all()
        assert np.isnan(prediction.output_tokens[:, hidden_arm]).all()
    if name not in DEFAULT_ONLY:
        observed_mean = np.nanmean(train.quality[~half, 0])
        assert abs(np.mean(prediction.quality[:, 0]) - observed_mean) < 0.15


def test_settings_rebuild_an_equal_predictor(fitted):
    for name, predictor in fitted.items():
        assert make_predictor(name, **predictor.settings()).settings() == predictor.settings()


def test_arm_predictions_subset():
    prediction = ArmPredictions(np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32))
    assert prediction.subset(np.array([0, 2])).quality.shape == (2, 2)


def test_knn_neighbour_mean_is_the_mean_over_observed_neighbours():
    from r2ray.predictor.carrot import masked_neighbour_mean
    rng = np.random.default_rng(3)
    values = rng.random((50, 6)).astype(np.float32)
    neighbours = rng.integers(0, 50, size=(20, 5))
    np.testing.assert_allclose(masked_neighbour_mean(values, neighbours),
                               values[neighbours].mean(axis=1), rtol=1e-6)   # no hole: fast path
    values[neighbours[0], 2] = np.nan                  # query 0: no neighbour observed in arm 2
    values[::3, 4] = np.nan
    mean = masked_neighbour_mean(values, neighbours)
    assert np.isnan(mean[0, 2])
    gathered = values[neighbours]
    reference = np.nansum(gathered, axis=1) / (~np.isnan(gathered)).sum(axis=1)   # 0/0: NaN
    np.testing.assert_allclose(mean, reference, rtol=1e-6)


def test_carrot_logistic_is_each_arms_own_l2_fit_whatever_arms_beside_it():
    """Per arm: minimise Σ BCE over its observed rows + l2 / 2 · ‖w‖² (scikit-learn's C = 1 / l2).
    The penalty had been scaled by the observed cells per row, so an arm fitted beside 11 others
    was shrunk harder than alone (CARROT linear on 176 arms 16× harder than on 11)."""
    from r2ray.predictor.carrot import fit_logistic
    train, _ = planted_arrays(small_catalog(), n_queries=400, dim=8, seed=0, missing_share=0.2)
    x = (train.embedding - train.embedding.mean(axis=0)) / train.embedding.std(axis=0)
    l2 = 1.0
    weights, intercept = fit_logistic(x, train.quality, l2, max_iter=200)
    alone, _ = fit_logistic(x, train.quality[:, [0]], l2, max_iter=200)
    np.testing.assert_allclose(weights[:, 0], alone[:, 0], atol=1e-3)
    for arm in range(train.quality.shape[1]):       # the optimum's gradient, per arm, is zero
        rows = ~np.isnan(train.quality[:, arm])
        p = 1 / (1 + np.exp(-(x[rows] @ weights[:, arm] + intercept[arm])))
        residual = p - train.quality[rows, arm]
        gradient = np.append(x[rows].T @ residual + l2 * weights[:, arm], residual.sum())
        assert np.abs(gradient).max() < 0.05, (arm, np.abs(gradient).max())   # old code: 4.4–11.6


@pytest.mark.parametrize("name", ["per_arm_ridge", "carrot_knn_all", "carrot_linear_all",
                                  "averaged"])
def test_a_one_query_bench_says_cross_fitting_needs_two(world, catalog, name):
    """Was "the train set has no queries" (it had one): the calibrations' (and the average's)
    cross-fitting dealt it one fold, and the fit on the other folds had no rows."""
    settings = {"members": [{"kind": "per_arm_ridge"}, {"kind": "carrot_knn_all"}]} \
        if name == "averaged" else {}
    with pytest.raises(PredictorError, match="cross-fitting needs training queries in two folds "
                                             "at least, the train set has 1 query"):
        make_predictor(name, **settings).fit(world[0].subset(np.arange(1)), catalog)


@pytest.mark.parametrize("name", ["selected", "stacked"])
def test_cross_validation_over_more_folds_than_queries_is_refused(world, catalog, name):
    """5 folds on 4 queries ran as 4 folds, in silence: fold_ids deals no more folds than
    there are queries."""
    settings = {"candidates": "per_arm_ridge,carrot_knn_all"} if name == "selected" else {}
    with pytest.raises(PredictorError, match="5-fold cross-validation needs at least 5 training "
                                             "queries, the train set has 4"):
        make_predictor(name, folds=5, **settings).fit(world[0].subset(np.arange(4)), catalog)


def test_knn_predicts_an_arm_its_neighbours_lack_from_the_arms_training_mean(world, catalog):
    """An arm observed on a few queries was NaN on every query whose k nearest lacked it (16 of
    20 at k = 8, 6 rows of 120): the router never picked it there though the predictor had its
    outcomes. Now its training mean; an arm no row has stays NaN."""
    train, test = world
    quality, tokens = train.quality.copy(), train.output_tokens.copy()
    sparse, hidden = 0, 1
    quality[6:, sparse] = tokens[6:, sparse] = np.nan
    quality[:, hidden] = tokens[:, hidden] = np.nan
    holes = type(train)(**{**train.__dict__, "quality": quality, "output_tokens": tokens})
    predictor = make_predictor("carrot_knn_all", k=8).fit(holes, catalog)
    from r2ray.predictor.carrot import nearest_rows, unit_rows
    neighbours, = nearest_rows(unit_rows(test.embedding), unit_rows(train.embedding), 8)
    lacking = ~np.isin(neighbours, np.arange(6)).any(axis=1)   # no neighbour has the arm
    assert lacking.sum() >= 5
    np.testing.assert_allclose(predictor._predict(test.embedding).quality[lacking, sparse],
                               np.nanmean(quality[:6, sparse]), rtol=1e-6)
    prediction = predictor.predict(test.embedding)
    assert np.isfinite(prediction.quality[:, sparse]).all()
    assert np.isfinite(prediction.output_tokens[:, sparse]).all()
    assert np.isnan(prediction.quality[:, hidden]).all()
    assert np.isnan(prediction.output_tokens[:, hidden]).all()
    assert np.isfinite(np.delete(prediction.quality, hidden, axis=1)).all()
