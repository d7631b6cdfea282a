"""``r2ray train --tune``: the cross-validation's candidates as Ray Tune trials, stopped by ASHA.

Plain cross-validation (:mod:`r2ray.predictor.selection`) fits every candidate on every fold, one
after another, in this process. With a cluster there is room to fit candidates side by side and
to stop the ones that trail: each candidate is a Tune trial on the cluster Ray is connected to
(or a local one), fitting fold by fold and reporting the AUDC of its out-of-fold predictions on
the folds done so far (uncalibrated: the calibrations need every fold). ASHA (grace period one
fold, reduction factor ``ASHA_REDUCTION``) stops a candidate that trails the others at the same
number of folds. The survivors' out-of-fold predictions come back as trial checkpoints and are
scored exactly as plain cross-validation scores them, so the winner is chosen by the same rule;
a stopped candidate is listed in the CV table with its folds done and running AUDC. A trial whose
fit raises stops the selection with an error naming its candidate, as plain cross-validation does.

Trials write checkpoints under ``storage_path`` (``--tune-storage``; default: a temporary folder,
fine for one machine; on a multi-node cluster give shared storage, e.g. ``s3://bucket/tune``, as
Tune needs). A relative local folder is made absolute (:func:`storage_uri`).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from r2ray.catalog import Catalog
from r2ray.cluster import ray_address
from r2ray.predictor.base import ArmPredictions, fold_predictions
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.selection import Candidate, failed_candidate

ASHA_REDUCTION = 2
CPUS_PER_TRIAL = 1.0


def fold_audc(predictions: ArmPredictions, train: BenchArrays, catalog: Catalog,
              rows: np.ndarray) -> float:
    """AUDC of uncalibrated out-of-fold predictions on ``rows`` (the evaluation's metric)."""
    from r2ray.evaluation.method_scores import evaluable_queries, score_predictions

    test = train.subset(rows)
    keep = evaluable_queries(test, catalog)
    return score_predictions({"c": predictions.subset(rows[keep])}, test.subset(keep),
                             catalog)["c"]["audc"]


def candidate_trial(config: dict, train: BenchArrays, catalog: Catalog,
                    fold: np.ndarray) -> None:
    """One Tune trial: ``config["candidate"]`` fitted fold by fold; reports ``fold`` (folds done)
    and ``audc`` (mean over them) after each, with its out-of-fold predictions so far as the
    checkpoint."""
    from ray import tune

    candidate = Candidate(**config["candidate"])
    quality = np.full(train.quality.shape, np.nan, dtype=np.float32)
    tokens = np.full(train.quality.shape, np.nan, dtype=np.float32)
    scores, started = [], time.perf_counter()
    for done, f in enumerate(np.unique(fold), start=1):
        rows, predicted = fold_predictions(candidate.build, train, catalog, fold, f)
        quality[rows], tokens[rows] = predicted.quality, predicted.output_tokens
        scores.append(fold_audc(ArmPredictions(quality, tokens), train, catalog, rows))
        with tempfile.TemporaryDirectory() as folder:
            np.savez(os.path.join(folder, "oof.npz"), quality=quality, tokens=tokens,
                     seconds=time.perf_counter() - started)
            tune.report({"fold": done, "audc": float(np.mean(scores))},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def asha_search(singles: list[Candidate], train: BenchArrays, catalog: Catalog, fold: np.ndarray,
                log: Callable[[str], None], storage_path: str | None = None):
    """:data:`r2ray.predictor.selection.OutOfFoldSearch` on Ray Tune with ASHA (module doc)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if not ray.is_initialized():
        ray.init(address=ray_address(), include_dashboard=False, log_to_driver=False)
    n_folds = len(np.unique(fold))
    trainable = tune.with_resources(
        tune.with_parameters(candidate_trial, train=train, catalog=catalog, fold=fold),
        {"cpu": CPUS_PER_TRIAL})
    scheduler = ASHAScheduler(time_attr="fold", max_t=n_folds, grace_period=1,
                              reduction_factor=ASHA_REDUCTION)
    order = {c.name: i for i, c in enumerate(singles)}
    with tempfile.TemporaryDirectory(prefix="r2ray-tune-") as scratch:
        tuner = tune.Tuner(
            trainable,
            param_space={"candidate": tune.grid_search(
                [{"name": c.name, "kind": c.kind, "settings": c.settings} for c in singles])},
            tune_config=tune.TuneConfig(metric="audc", mode="max", scheduler=scheduler),
            run_config=tune.RunConfig(name="r2ray-cv",
                                      storage_path=storage_uri(storage_path or scratch),
                                      verbose=0))
        results = tuner.fit()
        check_trials_ran(singles, results)
        oof, seconds, stopped = {}, {}, []
        for result in results:
            name = result.config["candidate"]["name"]
            done = int(result.metrics["fold"])
            if done < n_folds:
                stopped.append({"name": name, "folds": done, "audc": result.metrics["audc"]})
                log(f"  cv (tune): {name} stopped by ASHA after {done} fold(s)")
                continue
            with result.checkpoint.as_directory() as folder:
                saved = np.load(os.path.join(folder, "oof.npz"))
                oof[name] = ArmPredictions(saved["quality"], saved["tokens"])
                seconds[name] = float(saved["seconds"])
            log(f"  cv (tune): {name} {n_folds} folds in {seconds[name]:.1f} s")
    ordered = {c.name: oof[c.name] for c in singles if c.name in oof}   # candidate order
    return ordered, seconds, sorted(stopped, key=lambda row: order[row["name"]])


def storage_uri(storage_path: str) -> str:
    """``storage_path`` as Tune takes it: a URI (``s3://...``) as given, a local folder made
    absolute (Tune hands it to pyarrow's ``FileSystem.from_uri``: ``--tune-storage runs/tune``
    failed with "ArrowInvalid: URI has empty scheme" after the data was read and embedded)."""
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def check_trials_ran(singles: list[Candidate], results) -> None:
    """A trial whose fit raised stops the selection as in plain cross-validation: one error
    naming the first such candidate (in candidate order) and its settings, not Ray's traceback of
    a trial id (``RayTaskError``) that names neither."""
    errors = {result.config["candidate"]["name"]: result.error for result in results
              if result.error is not None}
    for candidate in singles:
        if candidate.name in errors:
            error = errors[candidate.name]
            cause = getattr(error, "cause", None) or error   # RayTaskError: the fit's own error
            raise failed_candidate(candidate, cause) from error
