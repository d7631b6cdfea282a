"""The training job end to end on a planted bench: jobs/train_predictor.py, then `r2ray train`
with --promote; plus its data preparation (catalogue beside the bench, splits, embeddings)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import REPO, run_script
from predictor_world import model_folder, planted_bench_table, small_catalog

from r2ray.bench.io import write_table
from r2ray.catalog import catalog_from_dict, save_catalog
from r2ray.cli import main
from r2ray.encoders import EncoderError
from r2ray.errors import R2RayError
from r2ray.predictor import make_predictor
from r2ray.registry import RegisteredPredictor, VersionInfo
from r2ray.training import (TrainConfig, TrainResult, evaluation_arrays, load_training_data,
                            parse_settings, split_training_data)



@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A planted bench (300 queries × 12 arms) with its catalogue beside it, and a queries table
    with 16-dimensional embeddings."""
    folder = tmp_path_factory.mktemp("train")
    catalog = small_catalog()
    table, queries = planted_bench_table(catalog, n_queries=300, dim=16, seed=0)
    write_table(table, str(folder / "bench.parquet"))
    write_table(queries, str(folder / "queries.parquet"))
    save_catalog(catalog, str(folder / "bench.catalog.yaml"))
    return folder, catalog


def config(folder: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{"bench": str(folder / "bench.parquet"),
                          "queries": str(folder / "queries.parquet"),
                          "registered_name": "r2ray-test"} | overrides)


def test_job_trains_logs_registers_then_promotion_compares_on_the_same_test(
        bench, capsys, monkeypatch, mlflow_store):
    folder, catalog = bench
    tracking = mlflow_store(folder)
    common = ["--bench", str(folder / "bench.parquet"), "--queries", str(folder / "queries.parquet"),
              "--register", "r2ray-test", "--promote", "champion", "--tracking-uri", tracking]
    for name in ("R2RAY_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(folder)  # artifacts of both runs land in this test's folder
    code = run_script(REPO / "jobs" / "train_predictor.py", *common, "--select", "none",
                      "--epochs", "3", "--set", "monotone=budgets")
    first = capsys.readouterr()
    assert code == 0, first.err[-3000:]
    assert "registered models:/r2ray-test/1" in first.out
    assert "alias @champion: promoted (no current holder)" in first.out

    assert main(["train", *common, "--predictor", "per_arm_ridge"]) == 0
    report = capsys.readouterr().out
    assert "registered models:/r2ray-test/2" in report
    assert " s in all (start-up " in report and ", fit " in report  # the command's wall time
    candidate = next(line for line in report.splitlines() if "candidate" in line)
    holder = next(line for line in report.splitlines() if "holder" in line)
    assert "models:/r2ray-test/2" in candidate and "audc" in candidate
    assert "models:/r2ray-test/1" in holder and "audc" in holder  # both scored, both printed

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version("r2ray-test", "1")
    run = client.get_run(version.run_id)
    assert run.data.params["predictor.monotone"] == "budgets"
    assert run.data.params["n_test"] == "60" and run.data.params["encoder_used"] == "None"
    for metric in ("test_brier", "test_log_tokens_mae", "test_audc", "test_qnc", "test_peak",
                   "train_seconds", "epochs_run"):
        assert np.isfinite(run.data.metrics[metric]), metric
    assert len(client.get_metric_history(run.info.run_id, "validation_loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_arm_test_metrics.json", "calibration.png", "train_config.json",
            "catalog.yaml"} <= artifacts
    holder_now = client.get_model_version_by_alias("r2ray-test", "champion").version
    promoted = "alias @champion: promoted" in report
    assert str(holder_now) == ("2" if promoted else "1")


def test_promotion_leaves_out_the_test_queries_the_holder_was_fitted_on(
        bench, capsys, monkeypatch, mlflow_store, tmp_path):
    """Retrained with another --seed, 48 of the 60 test queries were the holder's training
    queries: it was scored on what it had fitted, and kept the alias from memory."""
    from r2ray.evaluation.method_scores import score_predictor
    from r2ray.registry import load_registered

    folder, _ = bench
    tracking = mlflow_store(tmp_path)
    for name in ("R2RAY_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    common = ["--bench", str(folder / "bench.parquet"), "--queries", str(folder / "queries.parquet"),
              "--register", "r2ray-test", "--promote", "champion", "--tracking-uri", tracking,
              "--predictor", "per_arm_ridge", "--select", "none"]
    assert main(["train", *common, "--seed", "0"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--seed", "1"]) == 0
    report = capsys.readouterr().out
    data = load_training_data(config(folder))
    first = split_training_data(data.arrays, config(folder, select="none", seed=0))
    fitted = data.arrays.query_id[np.concatenate([first["train"], first["validation"]])]
    test = split_training_data(data.arrays, config(folder, select="none", seed=1))["test"]
    unseen = test[~np.isin(data.arrays.query_id[test], fitted)]
    assert 0 < len(unseen) < len(test)
    assert f"on the {len(unseen)} of {len(test)} test queries the holder was not fitted on" in report
    holder = load_registered("models:/r2ray-test/1", tracking_uri=tracking)
    audc = score_predictor(holder.predictor, data.arrays.subset(unseen), holder.catalog)["audc"]
    holder_line = next(line for line in report.splitlines() if line.startswith("  holder"))
    assert f"audc {audc:.4f}" in holder_line     # scored on the queries it never saw


def test_catalog_beside_the_bench_and_the_queries_embeddings_are_used(bench):
    folder, catalog = bench
    data = load_training_data(config(folder))
    assert data.catalog == catalog and data.encoder_spec is None
    assert data.arrays.embedding.shape == (300, 16) and data.arrays.quality.shape == (300, 12)


def test_text_is_embedded_with_minilm_when_no_embeddings_are_given(tmp_path):
    table, _ = planted_bench_table(small_catalog(), n_queries=12, dim=16, seed=0)
    write_table(table, str(tmp_path / "bench.parquet"))  # no catalogue beside: the default pool
    with pytest.raises(R2RayError, match="unknown model 'model-0'"):
        load_training_data(config(tmp_path, queries=None))
    save_catalog(small_catalog(), str(tmp_path / "bench.catalog.yaml"))
    data = load_training_data(config(tmp_path, queries=None))
    assert data.encoder_spec == "minilm" and data.arrays.embedding.shape == (12, 384)


def test_embeddings_that_do_not_fit_the_named_encoder_fail_clearly(bench):
    folder, _ = bench
    with pytest.raises(EncoderError, match="dimension 16 does not match the predictor's 384"):
        load_training_data(config(folder, encoder="minilm"))


def test_splits_keep_test_out_of_training_and_validation(bench):
    folder, _ = bench
    arrays = load_training_data(config(folder)).arrays
    rows = split_training_data(arrays, config(folder, seed=4, select="none"))
    train, validation, test = (set(rows[k].tolist()) for k in ("train", "validation", "test"))
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert len(train | validation | test) == 300 and len(test) == 60 and len(validation) == 24
    cv = split_training_data(arrays, config(folder, seed=4))  # the CV folds all of train
    assert cv["train"].tolist() == sorted(train | validation) and len(cv["validation"]) == 0
    assert cv["test"].tolist() == rows["test"].tolist()
    by_category = split_training_data(arrays, config(folder, split="category", seed=1))
    held_out = set(arrays.category[by_category["test"]])
    assert len(held_out) == 1
    assert held_out.isdisjoint(arrays.category[by_category["train"]])
    assert held_out.isdisjoint(arrays.category[by_category["validation"]])


def test_parse_settings():
    assert parse_settings(["monotone=budgets", "epochs=8", "hidden=[8, 4]"]) == {
        "monotone": "budgets", "epochs": 8, "hidden": [8, 4]}
    with pytest.raises(R2RayError, match="KEY=VALUE"):
        parse_settings(["monotone"])


def test_the_holder_is_scored_on_the_same_test_queries_in_its_own_terms(bench):
    folder, catalog = bench
    data = load_training_data(config(folder))
    test_ids = data.arrays.query_id[:6]
    repriced = catalog_from_dict(catalog.to_dict() | {"models": [
        m | {"output_per_m": 2 * m["output_per_m"]} for m in catalog.to_dict()["models"]]})
    holder = make_predictor("per_arm_ridge").fit(data.arrays, catalog)
    same = evaluation_arrays(RegisteredPredictor(holder, catalog, None, None), data, test_ids)
    assert same.query_id.tolist() == test_ids.tolist() and same.embedding.shape == (6, 16)
    own_prices = evaluation_arrays(RegisteredPredictor(holder, repriced, None, None), data, test_ids)
    np.testing.assert_allclose(own_prices.quality, same.quality)
    assert (own_prices.cost_usd > same.cost_usd).all()     # its own catalogue, its own prices
    text_holder = evaluation_arrays(RegisteredPredictor(holder, catalog, "minilm", None), data,
                                    test_ids)
    assert text_holder.embedding.shape == (6, 384)        # embedded with the holder's encoder
    minilm_run = replace(data, encoder_spec="minilm")
    with pytest.raises(ValueError, match="cannot be scored on the same inputs"):
        evaluation_arrays(RegisteredPredictor(holder, catalog, None, None), minilm_run, test_ids)


def test_a_holder_trained_on_other_weights_of_the_runs_encoder_is_not_scored_on_its_embeddings(
        bench, tmp_path):
    """Same encoder name, other weights (a package upgrade between the two trainings): the holder
    was scored on this run's embeddings, which are not the ones it learned from."""
    from r2ray.predictor.persist import load_predictor, save_predictor

    folder, catalog = bench
    spec = model_folder(tmp_path / "encoder", b"weights v1")
    fitted = make_predictor("per_arm_ridge").fit(load_training_data(config(folder)).arrays,
                                                 catalog)
    holder = load_predictor(save_predictor(fitted, str(tmp_path / "holder"), encoder_spec=spec))
    model_folder(tmp_path / "encoder", b"weights v2, upgraded")
    run = replace(load_training_data(config(folder)), encoder_spec=spec)  # its embeddings: v2's
    registered = RegisteredPredictor(holder, catalog, spec, VersionInfo("r2ray", "4", None, ""))
    with pytest.raises(EncoderError, match="models:/r2ray/4 was trained on embeddings of encoder"):
        evaluation_arrays(registered, run, run.arrays.query_id[:6])


class CountingEncoder:
    """Stands in for MiniLM: 384 zeros per text, counting the calls."""

    name, device, dimension = "fake", "cpu", 384

    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(len(texts))
        return np.zeros((len(texts), self.dimension), dtype=np.float32)


def test_embedding_prints_progress_per_chunk(tmp_path, capsys, monkeypatch):
    table, _ = planted_bench_table(small_catalog(), n_queries=12, dim=16, seed=0)
    write_table(table, str(tmp_path / "bench.parquet"))
    save_catalog(small_catalog(), str(tmp_path / "bench.catalog.yaml"))
    encoder = CountingEncoder()
    monkeypatch.setattr("r2ray.training.load_encoder", lambda spec: encoder)
    monkeypatch.setattr("r2ray.embedding_cache.EMBED_CHUNK_QUERIES", 5)
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE", "off")   # a fake encoder has no model folder
    data = load_training_data(config(tmp_path, queries=None))
    assert data.arrays.embedding.shape == (12, 384) and encoder.calls == [5, 5, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["5/12", "10/12", "12/12"]
    assert all(line.startswith("embedding with fake on cpu: ") and "queries/s" in line
               for line in lines)


def test_report_gives_the_wall_time_and_its_parts():
    result = TrainResult("run", VersionInfo("r2ray", "3", "run", "src", tags={"kind": "r2ray"}),
                         {"test_brier": 0.1, "test_log_tokens_mae": 0.2,
                          "test_calibration_error": 0.03}, None,
                         {"train": 70, "validation": 10, "test": 20},
                         {"read and embed": 76.0, "fit": 8.4, "score, log and register": 2.1})
    report = result.report(wall_seconds=89.0)
    assert ("89.0 s in all (start-up 2.5 s, read and embed 76.0 s, fit 8.4 s, "
            "score, log and register 2.1 s)") in report
    assert "in 8.4 s" not in report
    assert "86.5 s in all (read and embed" in result.report()


@pytest.mark.parametrize("extra, message", [
    (["--folds", "1"], "--folds: Input should be greater than or equal to 2"),
    (["--epochs", "0", "--predictor", "per_arm_ridge"], "--epochs: Input should be greater than 0"),
    (["--seed", "-1", "--predictor", "per_arm_ridge"],
     "--seed: Input should be greater than or equal to 0"),
])
def test_cli_train_refuses_bad_values_naming_the_flag(bench, capsys, tmp_path, extra, message):
    """Exit 2 and one line, not a pydantic or numpy traceback (exit 1)."""
    folder, _ = bench
    code = main(["train", "--bench", str(folder / "bench.parquet"), "--queries",
                 str(folder / "queries.parquet"), "--register", "x", "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", *extra])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--predictor", "per_arm_ridge", "--set", "alpha=-1"],
     "predictor 'per_arm_ridge': setting alpha=-1: input should be greater than 0"),
    (["--predictor", "r2ray", "--set", "dropout=1.5"],
     "predictor 'r2ray': setting dropout=1.5: input should be less than 1"),
    (["--predictor", "carrot_knn_all", "--select", "cv", "--set", "k=0"],   # a cv candidate's
     "predictor 'carrot_knn_all': setting k=0: input should be greater than 0"),
    (["--predictor", "per_arm_mlp", "--select", "cv", "--set", "dropout=0.2"],  # no candidate
     "settings for per_arm_mlp apply to no candidate (per_arm_ridge, carrot_knn_all, r2ray, "
     "stacked, averaged)"),
])
def test_cli_train_refuses_a_bad_set_before_reading_the_bench(capsys, tmp_path, extra, message):
    """`--set alpha=-1` trained and registered a Ridge with a negative penalty (exit 0); a
    setting for a kind no cv candidate has was dropped silently. Both are refused up front: the
    bench named here does not exist, and the setting is what the one line names."""
    code = main(["train", "--bench", str(tmp_path / "missing.parquet"), "--register", "x",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_nan_or_infinite_embeddings_are_refused_before_the_fit(bench, tmp_path):
    """A NaN embedding made per_arm_ridge predict NaN on every arm for every query, silently."""
    import pyarrow as pa

    from r2ray.bench.io import read_table
    from r2ray.encoders import EncoderError

    folder, catalog = bench
    queries = read_table(str(folder / "queries.parquet"))
    vectors = queries.column("embedding").to_pylist()
    vectors[7][2] = float("nan")
    column = pa.array(vectors, queries.schema.field("embedding").type)
    write_table(queries.set_column(queries.schema.get_field_index("embedding"), "embedding",
                                   column), str(tmp_path / "queries.parquet"))
    with pytest.raises(R2RayError, match="embedding of query_id 'q7' has NaN or infinite"):
        load_training_data(config(folder, queries=str(tmp_path / "queries.parquet")))
    arrays = load_training_data(config(folder)).arrays
    embedding = arrays.embedding.copy()
    embedding[7, 2] = np.inf
    with pytest.raises(EncoderError, match="per_arm_ridge.fit.*row 8 has NaN or infinite"):
        make_predictor("per_arm_ridge").fit(arrays.with_embedding(embedding), catalog)


def test_a_catalogue_model_without_rows_is_refused(bench, tmp_path):
    """The joint network predicted such a model from an untrained embedding (q̂ ≈ 0.5, routable)."""
    folder, catalog = bench
    document = catalog.to_dict()
    document["models"].append(document["models"][0] | {"name": "model-new"})
    save_catalog(catalog_from_dict(document), str(tmp_path / "more.catalog.yaml"))
    with pytest.raises(R2RayError, match="no row of model.*'model-new'.*--warm-start"):
        load_training_data(config(folder, catalog=str(tmp_path / "more.catalog.yaml")))


def test_a_query_id_with_two_texts_is_refused_naming_the_row(bench, tmp_path):
    """Two sources' ids that collide: rows of q1 for model-2 were another question, and were
    learned (silently) as outcomes on the text of q1's first row, the one embedded."""
    import pyarrow as pa

    folder, _ = bench
    table, _ = planted_bench_table(small_catalog(), n_queries=20, dim=16, seed=0)
    texts = table.column("query").to_pylist()
    clash = [i for i, (q, m) in enumerate(zip(table.column("query_id").to_pylist(),
                                               table.column("model").to_pylist()))
             if q == "q1" and m == "model-2"]
    for i in clash:
        texts[i] = "another question under the same id"
    write_table(table.set_column(table.schema.get_field_index("query"), "query", pa.array(texts)),
                str(tmp_path / "bench.parquet"))
    save_catalog(small_catalog(), str(tmp_path / "bench.catalog.yaml"))
    first = table.column("query_id").to_pylist().index("q1") + 1
    message = (f"bench.parquet, row {clash[0] + 1}, field 'query': query_id 'q1' has another "
               f"text here than at row {first};")
    with pytest.raises(R2RayError, match=message):
        load_training_data(config(tmp_path, queries=str(folder / "queries.parquet")))


def test_a_query_id_with_two_embeddings_in_the_queries_is_refused(bench, tmp_path):
    """Two queries files whose ids collide: q4's embedding was the last row's, another question's
    vector, taken without a word. A file read twice (equal rows) still trains."""
    import pyarrow as pa

    from r2ray.bench.io import read_table

    folder, _ = bench
    queries = read_table(str(folder / "queries.parquet"))
    other = queries.slice(4, 1).set_column(1, "embedding", pa.array(
        [[9.0] * 16], queries.schema.field("embedding").type))
    write_table(pa.concat_tables([queries, other]), str(tmp_path / "clash.parquet"))
    with pytest.raises(R2RayError, match="query_id 'q4' has 2 rows with different embeddings"):
        load_training_data(config(folder, queries=str(tmp_path / "clash.parquet")))
    write_table(pa.concat_tables([queries, queries.slice(4, 1)]), str(tmp_path / "twice.parquet"))
    twice = load_training_data(config(folder, queries=str(tmp_path / "twice.parquet"))).arrays
    once = load_training_data(config(folder)).arrays
    np.testing.assert_array_equal(twice.embedding, once.embedding)


@pytest.mark.parametrize("n, extra, message", [
    (2, {}, "2 queries: the random split leaves 1 for training (1 for test); 3-fold "
            "cross-validation needs at least 3 there (a bench of at least 4"),
    (3, {}, "3 queries: the random split leaves 2 for training (1 for test); 3-fold "
            "cross-validation needs at least 3 there (a bench of at least 4"),
    (2, {"select": "none"}, "2 queries: the random split leaves 1 for training (1 for test); "
                            "the early-stopping validation set needs at least 2 there (a bench "
                            "of at least 3"),
])
def test_a_bench_too_small_to_split_says_how_many_queries_it_has_and_needs(tmp_path, n, extra,
                                                                         message):
    """Was 'the train set has no queries' (a CV fold's empty fit set) or 'cannot split 1 queries
    into two parts; the bench needs at least 2' for a bench that had 2 or 3."""
    catalog = small_catalog(n_models=2)
    table, queries = planted_bench_table(catalog, n_queries=n, dim=8, seed=0)
    write_table(table, str(tmp_path / "bench.parquet"))
    write_table(queries, str(tmp_path / "queries.parquet"))
    save_catalog(catalog, str(tmp_path / "bench.catalog.yaml"))
    arrays = load_training_data(config(tmp_path)).arrays
    with pytest.raises(R2RayError, match="bench.parquet") as error:
        split_training_data(arrays, config(tmp_path, **extra))
    assert message in str(error.value)


def test_the_category_split_refuses_queries_without_one(bench):
    """Queries without a category were held out together as the category '' (`r2ray train
    --split category --seed 0`: a test set of the uncategorised, silently; `r2ray evaluate`
    refuses them); one category was named as [np.str_('chat')]."""
    folder, _ = bench
    arrays = load_training_data(config(folder)).arrays
    category = arrays.category.copy()
    category[[4, 9]] = ""
    with pytest.raises(R2RayError, match="needs a category on every query; query_id 'q4' has "
                                         "none \\(2 queries without one\\)"):
        split_training_data(replace(arrays, category=category), config(folder, split="category"))
    with pytest.raises(R2RayError, match=re.escape("the bench has ['chat']; use the random")):
        split_training_data(replace(arrays, category=np.full(arrays.n_queries, "chat")),
                            config(folder, split="category"))


def test_enough_queries_for_the_folds_split_cleanly(bench):
    folder, _ = bench
    arrays = load_training_data(config(folder)).arrays.subset(np.arange(4))
    rows = split_training_data(arrays, config(folder))          # 3 train, 1 test: folds of 1
    assert len(rows["train"]) == 3 and len(rows["test"]) == 1
    rows = split_training_data(arrays.subset(np.arange(3)), config(folder, select="none"))
    assert [len(rows[k]) for k in ("train", "validation", "test")] == [1, 1, 1]


def test_a_model_whose_every_row_the_split_holds_out_is_refused(tmp_path, capsys):
    """A model run on one category only, that category the test split: the training part had no
    row of it and the joint network predicted it from an untrained embedding (q̂ ≈ 0.47), silently
    registered; per-arm Ridge made its arms NaN (unroutable), also silently."""
    catalog = small_catalog(n_models=3)
    table, queries = planted_bench_table(catalog, n_queries=60, dim=8, seed=0)
    model = np.array(table.column("model").to_pylist())
    category = np.array(table.column("category").to_pylist())
    write_table(table.filter((model != "model-1") | (category == "math")),
                str(tmp_path / "bench.parquet"))
    write_table(queries, str(tmp_path / "queries.parquet"))
    save_catalog(catalog, str(tmp_path / "bench.catalog.yaml"))
    code = main(["train", "--bench", str(tmp_path / "bench.parquet"), "--queries",
                 str(tmp_path / "queries.parquet"), "--register", "x", "--split", "category",
                 "--seed", "2", "--candidates", "per_arm_ridge,carrot_knn_all",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the training part (category split, seed 2) has no row of model(s) 'model-1'" in err
