"""`r2ray demo` keeps everything under its workdir: the local store's artifacts included."""

from __future__ import annotations

import mlflow

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
