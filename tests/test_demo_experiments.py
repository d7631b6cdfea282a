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


def test_ctrl_c_prints_one_line_and_exits_as_interrupted(tmp_path, monkeypatch, capsys):
    """Ctrl-C in `make run` (here raised where the demo works) printed a 30-line traceback through
    Ray Data's internals and exited 1, the status of a crash: one line and 130 (128 + SIGINT)."""
    import signal

    import r2ray.demo

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(r2ray.demo, "run_demo", interrupted)
    try:
        code = main(["demo", "--workdir", str(tmp_path / "demo")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left r2ray.cli.main as a KeyboardInterrupt and its traceback")
    assert code == 128 + signal.SIGINT
    assert capsys.readouterr().err == "r2ray demo: interrupted; run it again to redo it\n"


def test_demo_steps_show_as_they_start_when_its_output_is_piped(tmp_path, monkeypatch):
    """`make run | tee log` (stdout a pipe, block-buffered): the [3/4] and [4/4] headers and the
    training report reached the pipe only when the demo exited, so the minutes of routing showed
    no step; each line is now written as it is printed."""
    import io
    import sys

    import r2ray.demo

    piped = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(piped, encoding="utf-8"))
    written = []

    def demo(**kwargs):
        print("[4/4] route")
        written.append(piped.getvalue())   # what the reader has while the step works

    monkeypatch.setattr(r2ray.demo, "run_demo", demo)
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 0
    assert written == [b"[4/4] route\n"]
