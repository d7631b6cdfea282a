"""`r2ray demo` keeps everything under its workdir: the local store's artifacts included."""

from __future__ import annotations

import mlflow
import pytest

from r2ray.cli import EXIT_USER_ERROR, main
from r2ray.demo import demo_experiments


def test_demo_artifacts_land_under_workdir_not_the_current_folder(tmp_path, monkeypatch):
    workdir, elsewhere = tmp_path / "demo dir", tmp_path / "elsewhere"
    workdir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tracking = f"sqlite:///{workdir}/mlflow.db"
    demo_experiments(tracking, f"{workdir}/mlartifacts")
    demo_experiments(tracking, f"{workdir}/mlartifacts")   # a second run: experiments exist
    mlflow.set_tracking_uri(tracking)
    try:
        for name in ("r2ray-train", "r2ray-register", "r2ray-batch"):
            mlflow.set_experiment(name)
            with mlflow.start_run():
                mlflow.log_text("x", "note.txt")
    finally:
        mlflow.set_tracking_uri(None)
    assert list(elsewhere.iterdir()) == []
    assert len(list((workdir / "mlartifacts").rglob("note.txt"))) == 3


@pytest.mark.parametrize("flags, named", [(["--queries", "0"], "--queries 0"),
                                          (["--queries", "-5"], "--queries -5"),
                                          (["--seed", "-1"], "--seed -1")])
def test_bad_demo_arguments_are_refused_before_any_work(tmp_path, monkeypatch, capsys, flags,
                                                        named):
    """`r2ray demo --queries 0` failed only when it wrote the backlog, after minutes of training:
    one line and exit 2 before the workdir, the bench or a model is made."""
    import r2ray.bench.synthetic
    import r2ray.training

    def started(*args, **kwargs):
        raise AssertionError("the demo started work on bad arguments")

    monkeypatch.setattr(r2ray.bench.synthetic, "write_world", started)
    monkeypatch.setattr(r2ray.training, "train_predictor_job", started)
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), *flags]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.startswith(f"r2ray demo: error: {named}:") and error.count("\n") == 1
    assert not workdir.exists()
