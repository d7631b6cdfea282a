"""`r2ray evaluate` and jobs/evaluate.py end to end on small synthetic benches."""

import json

import pytest

from conftest import REPO, run_script
from r2ray.bench.io import read_table, write_table
from r2ray.bench.synthetic import synth_backlog, synth_bench
from r2ray.catalog import load_catalog
from r2ray.cli import main
from r2ray.predictor import make_predictor, save_predictor
from r2ray.predictor.data import bench_arrays


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    """A 200-query world: bench and backlog with precomputed embeddings."""
    folder = tmp_path_factory.mktemp("world")
    catalog = load_catalog()
    write_table(synth_bench(catalog, 200, seed=3), str(folder / "bench.parquet"))
    write_table(synth_backlog(catalog, 200, seed=3, embeddings=True), str(folder / "backlog.parquet"))
    return folder


def test_evaluate_a_saved_predictor(bench_files, tmp_path, capsys):
    catalog = load_catalog()
    arrays = bench_arrays(read_table(str(bench_files / "bench.parquet")), catalog,
                          read_table(str(bench_files / "backlog.parquet")))
    saved = save_predictor(make_predictor("per_arm_ridge").fit(arrays, catalog),
                           str(tmp_path / "ridge"), encoder_spec="synthetic")
    out = tmp_path / "out"
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model", saved,
                 "--out", str(out), "--queries", str(bench_files / "backlog.parquet"),
                 "--seeds", "1", "--methods", "carrot_knn_default"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"per_arm_ridge", "carrot_knn_default", "oracle_all", "random"} <= set(metrics["methods"])
    assert metrics["model"]["encoder"] == "synthetic"
    assert metrics["embeddings"].startswith("precomputed")
    # the saved weights themselves, scored on every query they were trained on (in-sample)
    registered = metrics["registered"]
    assert registered["n_queries"] == 200
    assert 0 < registered["methods"]["registered"]["audc"] <= registered["methods"]["oracle_all"]["audc"]
    assert (out / "curves.png").exists()
    # cost calibration of every learned method; per arm for the subject; its plot beside curves.png
    calibration = metrics["cost_calibration"]["methods"]
    assert set(calibration) == {"per_arm_ridge", "carrot_knn_default"}
    ridge = calibration["per_arm_ridge"]
    assert len(ridge["per_decile"]) == 10 and len(ridge["overall_per_split"]) == 1
    assert 0.7 < ridge["overall_per_split"][0]["ratio"] < 1.3
    assert len(ridge["per_arm"]) == catalog.n_arms and "per_arm" not in calibration[
        "carrot_knn_default"]
    assert (out / "cost_calibration.png").read_bytes()[:4] == b"\x89PNG"
    # spend of the global-budget solve, billed at the bench's costs, for every learned method
    adherence = metrics["budget_adherence"]
    assert set(adherence) == {"per_arm_ridge", "carrot_knn_default", "oracle_all"}
    assert all(0 < level["realised_spend_ratio"] < 3 for block in adherence.values()
               for level in block["levels"])
    assert "per_arm_ridge" in capsys.readouterr().out
    # its embeddings came from no text encoder: without --queries nothing can embed the bench
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model", saved,
                 "--out", str(tmp_path / "again")])
    assert code == 2 and "'synthetic' embeddings" in capsys.readouterr().err


def test_a_model_that_names_no_encoder_is_not_scored_on_minilms_embeddings(bench_files, tmp_path,
                                                                           capsys):
    """Trained on precomputed embeddings with no --encoder named (encoder None): Serve and the
    batch job want an embedding with each query, but evaluate embedded the bench with MiniLM and
    scored the weights on those vectors (any other 384-dimensional space passed silently)."""
    catalog = load_catalog()
    arrays = bench_arrays(read_table(str(bench_files / "bench.parquet")), catalog,
                          read_table(str(bench_files / "backlog.parquet")))
    saved = save_predictor(make_predictor("per_arm_ridge").fit(arrays, catalog),
                           str(tmp_path / "ridge"))
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model", saved,
                 "--out", str(tmp_path / "out"), "--seeds", "1", "--methods", "per_arm_ridge"])
    assert code == 2 and "'precomputed' embeddings" in capsys.readouterr().err


def test_evaluate_encodes_query_text_without_a_queries_table(tmp_path):
    catalog = load_catalog()
    bench = tmp_path / "bench.jsonl"
    write_table(synth_bench(catalog, 40, seed=1), str(bench))
    code = main(["evaluate", "--bench", str(bench), "--model", "carrot_knn_all", "--out",
                 str(tmp_path / "out"), "--seeds", "1", "--methods", "per_arm_ridge"])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["embeddings"] == "encoder minilm"
    assert metrics["splits"][0]["n_test"] == 8


def test_bad_model_or_method_is_a_clear_error(bench_files, tmp_path, capsys):
    bench = str(bench_files / "bench.parquet")
    code = main(["evaluate", "--bench", bench, "--model", "no-such-model", "--out", str(tmp_path)])
    assert code == 2
    assert "neither a registry URI" in capsys.readouterr().err
    code = main(["evaluate", "--bench", bench, "--model", "r2ray", "--out", str(tmp_path),
                 "--queries", str(bench_files / "backlog.parquet"), "--methods", "knn"])
    assert code == 2
    assert "unknown method(s) knn" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_fitting(bench_files, tmp_path, capsys):
    """--out naming a file was a FileExistsError traceback after every split was fitted."""
    taken = tmp_path / "metrics.parquet"
    taken.write_bytes(b"mine")
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model",
                 "per_arm_ridge", "--out", str(taken), "--queries",
                 str(bench_files / "backlog.parquet"), "--seeds", "1", "--methods",
                 "per_arm_ridge"])
    assert code == 2 and f"--out {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_bytes() == b"mine"


def _evaluate_fast(bench_files, out, *extra):
    """`r2ray evaluate` of carrot_knn_default alone on one split (seconds)."""
    return main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model",
                 "carrot_knn_default", "--methods", "carrot_knn_default", "--out", str(out),
                 "--queries", str(bench_files / "backlog.parquet"), "--seeds", "1", *extra])


def test_a_second_run_into_the_same_out_leaves_no_plot_of_the_first(bench_files, tmp_path):
    """A run without --train-sizes into a folder where one with them had run left the old
    learning_curves.png beside a metrics.json with no learning curves."""
    out = tmp_path / "out"
    assert _evaluate_fast(bench_files, out, "--train-sizes", "40") == 0
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert _evaluate_fast(bench_files, out) == 0
    assert "learning_curves" not in json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [
        "cost_calibration.png", "curves.png", "metrics.json", "reliability.png"]


def test_a_run_stopped_while_writing_plots_leaves_no_metrics_json(bench_files, tmp_path,
                                                                   monkeypatch):
    """metrics.json was written before the plots: a run that failed (or was stopped) while
    writing them left a complete-looking metrics.json beside the previous run's plots. It is
    now written last, and the previous run's goes first."""
    from r2ray import storage

    out = tmp_path / "out"
    assert _evaluate_fast(bench_files, out) == 0
    write_bytes = storage.write_bytes

    def fail_on_reliability(uri, data):
        if uri.endswith("reliability.png"):
            raise OSError("no space left on device")
        write_bytes(uri, data)

    monkeypatch.setattr(storage, "write_bytes", fail_on_reliability)
    with pytest.raises(OSError, match="no space left"):
        _evaluate_fast(bench_files, out, "--train-sizes", "40")
    assert not (out / "metrics.json").exists()


def test_the_table_says_the_oracle_has_no_guaranteed_spend_not_never(bench_files, tmp_path,
                                                                      capsys):
    """oracle_all is solved without a spend guarantee (the truth has no spend simulation), and
    its `guaranteed` cell read "never", as if the guarantee had failed."""
    assert _evaluate_fast(bench_files, tmp_path / "out") == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()}
    assert rows["oracle_all"][-2] == "—", rows["oracle_all"]
    assert float(rows["carrot_knn_default"][-2]) > 0, rows["carrot_knn_default"]


@pytest.mark.parametrize("methods", [",", " , "])
def test_a_methods_list_naming_nothing_is_refused(bench_files, tmp_path, capsys, methods):
    """`--methods ,` ran no learned baseline, with nothing saying so (exit 0)."""
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model",
                 "per_arm_ridge", "--out", str(tmp_path / "out"), "--queries",
                 str(bench_files / "backlog.parquet"), "--seeds", "1", "--methods", methods])
    err = capsys.readouterr().err
    assert code == 2 and "--methods names no method; give one or more of r2ray" in err, err
    assert not (tmp_path / "out").exists()


def test_seeds_with_a_category_split_are_refused_not_ignored(bench_files, tmp_path, capsys):
    """`--split category --seeds 3` ran the one leave-one-category-out split and wrote
    ``seeds: [0]``, with nothing saying the 3 was ignored."""
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model",
                 "per_arm_ridge", "--out", str(tmp_path / "out"), "--queries",
                 str(bench_files / "backlog.parquet"), "--split", "category", "--seeds", "3",
                 "--methods", "per_arm_ridge"])
    err = capsys.readouterr().err
    assert code == 2 and "--seeds 3 asks for random splits; --split category" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sizes", [",", " , "])
def test_a_train_sizes_list_naming_nothing_is_refused_as_empty(bench_files, tmp_path, capsys,
                                                               sizes):
    """`--train-sizes ,` was refused with "every size must be at least 10 queries": it names
    no size at all."""
    code = main(["evaluate", "--bench", str(bench_files / "bench.parquet"), "--model",
                 "per_arm_ridge", "--out", str(tmp_path / "out"), "--queries",
                 str(bench_files / "backlog.parquet"), "--seeds", "1", "--methods",
                 "per_arm_ridge", "--train-sizes", sizes])
    err = capsys.readouterr().err
    assert code == 2 and f"--train-sizes {sizes!r} names no size; give whole numbers" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # an MLflow store and a pyfunc model version
def test_job_entry_point_evaluates_a_registered_version(bench_files, tmp_path, mlflow_store,
                                                        capsys):
    """jobs/evaluate.py (as `ray job submit` runs it) on a registered version: one evaluation
    checks both the entry point and the registry path."""
    from r2ray.registry import register_predictor

    catalog = load_catalog()
    arrays = bench_arrays(read_table(str(bench_files / "bench.parquet")), catalog,
                          read_table(str(bench_files / "backlog.parquet")))
    tracking = mlflow_store(tmp_path)
    version = register_predictor(make_predictor("carrot_knn_all").fit(arrays, catalog), "knn",
                                 encoder_spec="synthetic", tracking_uri=tracking)
    code = run_script(REPO / "jobs" / "evaluate.py", "--bench", str(bench_files / "bench.parquet"),
                      "--model", f"models:/knn/{version.version}", "--tracking-uri", tracking,
                      "--out", str(tmp_path / "out"), "--queries",
                      str(bench_files / "backlog.parquet"), "--seeds", "2", "--methods",
                      "per_arm_ridge")
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and metrics["methods"]["carrot_knn_all"]["audc_std"] >= 0
    assert metrics["model"]["name"] == "carrot_knn_all"
    assert metrics["model"]["version"]["version"] == version.version
    assert metrics["bench"]["catalog"] == "the model's training catalogue"
    assert "registered" in metrics["registered"]["methods"]
