"""`r2ray train --tune`: the cross-validation's candidates as Ray Tune trials with ASHA, on the
session's Ray cluster. Trials must compute exactly what plain cross-validation computes, and
every candidate must be either scored or reported as stopped."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from predictor_world import planted_arrays, small_catalog

from r2ray.errors import R2RayError
from r2ray.predictor.base import fold_ids, out_of_fold
from r2ray.predictor.selection import STACKED, Candidate, cross_validate
from r2ray.training import TrainConfig, build_predictor
from r2ray.tuning import asha_search

pytestmark = pytest.mark.slow


def test_asha_trials_give_the_plain_out_of_fold_predictions(ray_local, tmp_path):
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=300, dim=16, seed=0)
    singles = [Candidate("ridge", "per_arm_ridge", {}),
               Candidate("ridge_weak", "per_arm_ridge", {"alpha": 0.01}),
               Candidate("blind", "per_arm_ridge", {"alpha": 1e9}),     # arm means only
               Candidate("knn", "carrot_knn_all", {})]
    lines = []
    result = cross_validate(train, catalog, [*singles, Candidate(STACKED, STACKED, {})],
                            folds=3, log=lines.append,
                            search=lambda *a: asha_search(*a, storage_path=str(tmp_path)))
    scored = {row["name"] for row in result.table} - {STACKED}
    stopped = {row["name"] for row in result.stopped}
    assert scored | stopped == {c.name for c in singles} and not scored & stopped
    assert all(1 <= row["folds"] < 3 for row in result.stopped)
    assert scored   # ASHA keeps the first trial at each rung, so at least one finishes
    fold = fold_ids(train.n_queries, 3, 0)
    for candidate in singles:
        if candidate.name in scored:                          # the same fits, the same numbers
            plain = out_of_fold(candidate.build, train, catalog, fold)
            np.testing.assert_allclose(result.out_of_fold[candidate.name].quality,
                                       plain.quality, rtol=1e-6)
            np.testing.assert_allclose(result.out_of_fold[candidate.name].output_tokens,
                                       plain.output_tokens, rtol=1e-6)
    best = max(result.table, key=lambda row: row["audc"])
    assert result.winner == best["name"] or best["audc"] - next(
        r["audc"] for r in result.table if r["name"] == result.winner) <= 0.001
    if len(scored) >= 2:   # the stack blends the survivors only
        stack = next(c for c in result.candidates if c.name == STACKED)
        assert len(stack.settings["members"]) == len(scored)
    report = result.report()
    assert all(f"{name} " in report for name in scored | stopped)
    print(report, *lines, sep="\n")


def test_tune_needs_the_cross_validation(tmp_path):
    config = TrainConfig(bench=str(tmp_path), registered_name="x", select="none", tune=True)
    with pytest.raises(R2RayError, match="--tune searches"):
        build_predictor(config)


def test_the_batch_job_names_a_ray_address_where_no_cluster_answers(monkeypatch):
    """The nightly job's own Ray start retried an address nothing answers at past 90 s (a
    route killed by a timeout left its attempt folder behind)."""
    import ray

    from r2ray.batch.job import _init_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init reached: it would hang"))
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(R2RayError, match=f"RAY_ADDRESS='{address}': no Ray cluster answers there"):
        _init_ray()


def _closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_tune_names_a_ray_address_where_no_cluster_answers(monkeypatch):
    """RAY_ADDRESS pointing at no cluster is one error naming it, not ray.init retrying the GCS
    for minutes (it was still retrying after 300 s)."""
    import ray

    port = _closed_port()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("ray.init reached: it would hang"))
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=30, dim=4, seed=0)
    fold = fold_ids(train.n_queries, 3, 0)
    singles = [Candidate("ridge", "per_arm_ridge", {})]
    for address, why in [(f"127.0.0.1:{port}", "no Ray cluster answers there"),
                         (f"ray://127.0.0.1:{port}", "no Ray cluster answers there"),
                         ("head-node", "give the Ray head as HOST:PORT")]:
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(R2RayError, match=f"RAY_ADDRESS='{address}': {why}"):
            asha_search(singles, train, catalog, fold, print)


@pytest.mark.parametrize("answers, joins", [(False, "local"), (True, None)])
def test_a_recorded_cluster_that_is_gone_starts_a_local_ray(tmp_path, monkeypatch, capsys,
                                                           answers, joins):
    """RAY_ADDRESS unset, Ray joins the cluster ``ray start`` recorded in ray_current_cluster; a
    head killed without ``ray stop`` leaves the record, and `make run` retried that dead GCS for
    minutes. A record nothing answers at starts a local Ray (one line says so); a live one is
    joined as before."""
    import ray
    import ray._common.utils

    from r2ray.batch.job import _init_ray

    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        if answers:
            head.listen()
        record = tmp_path / "ray_current_cluster"
        record.write_text(f"127.0.0.1:{head.getsockname()[1]}")
        if not answers:
            head.close()
        monkeypatch.setattr(ray._common.utils, "get_ray_address_file", lambda temp_dir: str(record))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        init = {}
        monkeypatch.setattr(ray, "init", lambda **kwargs: init.update(kwargs))
        _init_ray()
    assert init["address"] == joins and init["include_dashboard"] is False
    said = capsys.readouterr().err
    assert ("does not answer; starting a local Ray" in said) == (not answers)



class FakeResult:
    """A Tune result: the trial's candidate and error (``None``: it ran)."""

    def __init__(self, name, error=None):
        self.config, self.error = {"candidate": {"name": name}}, error
        self.metrics = {"fold": 0, "audc": float("nan")}


def fake_tune(monkeypatch, results: list[FakeResult]) -> dict:
    """Tune stood in for, so no Ray starts: ``Tuner.fit`` returns ``results``; the returned dict
    gets the Tuner's keyword arguments."""
    import ray
    from ray import tune

    made = {}

    class Tuner:
        def __init__(self, trainable, **kwargs):
            made.update(kwargs)

        def fit(self):
            return results

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(tune, "Tuner", Tuner)
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **_: trainable)  # no object
    monkeypatch.setattr(tune, "with_resources", lambda trainable, _: trainable)     # store
    return made


def test_a_trial_whose_fit_raises_is_named_as_in_plain_cross_validation(monkeypatch):
    """A trial's failed fit came back as Ray's RayTaskError: a traceback of a trial id, naming
    neither the candidate nor its settings; plain cross-validation names both. (What Tune returned
    for such a trial: its error wraps the fit's own.)"""
    from ray.exceptions import RayTaskError

    from r2ray.predictor.base import PredictorError

    bad = PredictorError("predictor 'per_arm_ridge': setting alpha=-5.0: input should be "
                         "greater than 0")
    trial_error = RayTaskError("ImplicitFunc.train", "Traceback ...", bad).as_instanceof_cause()
    fake_tune(monkeypatch, [FakeResult("weak", trial_error), FakeResult("bad", trial_error)])
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=30, dim=4, seed=0)
    singles = [Candidate("bad", "per_arm_ridge", {"alpha": -5.0}),
               Candidate("weak", "per_arm_ridge", {"alpha": 0.01})]
    with pytest.raises(R2RayError, match=r"^cross-validation: candidate 'bad' \(per_arm_ridge, "
                                         r"settings \{'alpha': -5.0\}\) failed to fit: "
                                         r"PredictorError: predictor 'per_arm_ridge': setting"):
        asha_search(singles, train, catalog, fold_ids(train.n_queries, 3, 0), print)


def test_a_relative_tune_storage_is_made_absolute(monkeypatch, tmp_path):
    """``--tune-storage runs/tune`` reached Tune as given, and Tune's pyarrow refused it
    ("ArrowInvalid: URI has empty scheme") after the data was read; a URI stays as given."""
    monkeypatch.chdir(tmp_path)
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=30, dim=4, seed=0)
    fold = fold_ids(train.n_queries, 3, 0)
    for given, used in [("runs/tune", str(tmp_path / "runs" / "tune")),
                        ("s3://bucket/tune", "s3://bucket/tune")]:
        made = fake_tune(monkeypatch, [])
        asha_search([Candidate("ridge", "per_arm_ridge", {})], train, catalog, fold, print,
                    storage_path=given)
        assert made["run_config"].storage_path == used
