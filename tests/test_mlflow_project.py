"""mlflow/MLproject: `mlflow run mlflow/ -e E -P ...` trains as `r2ray train` with the same options
does, its commands parsed by the r2ray CLI as MLflow writes them (no training is run)."""

from __future__ import annotations

import shlex

import pytest

from conftest import REPO


def train_config(monkeypatch, argv: list[str]):
    """The TrainConfig `r2ray <argv>` would train with."""
    import r2ray.training
    from r2ray import cli

    seen = []

    class Done:
        def report(self, **_):
            return ""

    monkeypatch.setattr(r2ray.training, "train_predictor_job",
                        lambda config: seen.append(config) or Done())
    assert cli.main(argv) == 0
    return seen[0]


@pytest.mark.parametrize("entry_point, params", [
    ("train", {"bench": "w.parquet"}),
    ("train_with_embeddings", {"bench": "w.parquet", "queries": "b.parquet"})])
def test_mlflow_run_trains_as_r2ray_train(monkeypatch, tmp_path, entry_point, params):
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(REPO / "mlflow")).get_entry_point(entry_point)
    command = shlex.split(entry.compute_command(params, storage_dir=str(tmp_path)))
    assert command[:2] == ["r2ray", "train"]
    via_mlflow = train_config(monkeypatch, command[1:])
    given = [arg for name, value in params.items() for arg in (f"--{name}", value)]
    plain = train_config(monkeypatch, ["train", *given, "--register", "r2ray",
                                       "--promote", "champion"])
    assert via_mlflow == plain
    assert via_mlflow.select == "cv"
    # an option the entry point does not declare still reaches r2ray train (MLflow appends it)
    command = shlex.split(entry.compute_command({**params, "predictor": "carrot_knn_all"},
                                                storage_dir=str(tmp_path)))
    assert train_config(monkeypatch, command[1:]).predictor == "carrot_knn_all"
