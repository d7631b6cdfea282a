"""The training job as a library function: bench → split → fit → MLflow run → registered version.

:func:`train_predictor_job` reads a long bench (and optionally a queries table with precomputed
``embedding``s, e.g. a synthetic backlog), embeds the queries if needed, splits off a test set
(random or leave-one-category-out), and fits on the rest. By default (``select="cv"``) it fits the
``selected`` predictor: K-fold cross-validation over candidates on the training part only, the
winner refitted on all of it (:mod:`r2ray.predictor.selection`; the CV table is printed and logged).
With ``select="none"`` it fits ``predictor`` alone, with an early-stopping validation set carved
from the training part (never from the test set). It logs params / metrics / per-arm table /
calibration plot to an MLflow run, registers a pyfunc version, and with ``promote`` moves the alias only when the new
version beats the current holder on this run's test split (both scored by
:func:`r2ray.evaluation.method_scores.score_predictor`).

:func:`warm_start_job` (``r2ray train --warm-start``) adds models to a registered predictor
instead: it loads the version, checks the extended catalogue against the one it carries, reads
rows of the new models, fits only their parameters (:mod:`r2ray.predictor.extend`) and registers
the result as a new version. Its ``promote`` moves the alias only from the version it extended
(or when none holds it): the new rows cannot score the old arms, so there is no test to compare on.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from r2ray import storage
from r2ray.bench.io import SUFFIXES, read_bench, read_table
from r2ray.catalog import Catalog
from r2ray.embedding_cache import embed_texts
from r2ray.encoders import (MINILM, check_embedding_dimension, has_text_encoder, load_encoder,
                            model_encoder, recorded_fingerprint)
from r2ray.errors import R2RayError
from r2ray.predictor import make_predictor
from r2ray.predictor.base import BasePredictor
from r2ray.predictor.data import BenchArrays, bench_arrays, holdout_indices, split_indices
from r2ray.predictor.diagnostics import calibration_bins, per_arm_report, summary_metrics
from r2ray.predictor.extend import DEFAULT_FOLDS, DEFAULT_PRIOR, ExtensionReport
from r2ray.redaction import redact_text, redact_values
from r2ray.registry import (Promotion, RegisteredPredictor, VersionInfo, alias_holder,
                            configure_tracking, load_registered, mlflow_guard, promote_if_better,
                            register_predictor)

log = logging.getLogger(__name__)
TRAINING_QUERIES = "training_query_ids.json"   # run artifact: the query ids a version was fitted on


class TrainConfig(BaseModel):
    """Everything the job needs; saved with the run as ``train_config.json``."""

    model_config = ConfigDict(extra="forbid")

    bench: str                                   # long bench: file, folder or glob (any fsspec URI)
    registered_name: str                         # registered model name, e.g. "r2ray"
    queries: str | None = None                   # table with query_id + embedding
    catalog: str | None = None                   # default: <bench>.catalog.yaml, else the pool
    encoder: str | None = None                   # minilm | a local sentence-transformers folder
    predictor: str = "r2ray"                     # a key of r2ray.predictor.PREDICTORS
    settings: dict = Field(default_factory=dict)  # predictor constructor settings
    select: Literal["cv", "none"] = "cv"         # cv: choose among candidates by K-fold CV;
                                                 # none: fit `predictor` alone
    candidates: str = "small"                    # cv: a set (small, fast, full) or names, comma-separated
    folds: Annotated[int, Field(ge=2)] = 3       # cv: folds, by query, over the training part
    tune: bool = False                           # cv: candidates as Ray Tune trials, ASHA
    tune_storage: str | None = None              # where Tune trials checkpoint
    split: Literal["random", "category"] = "random"
    seed: Annotated[int, Field(ge=0)] = 0        # numpy seeds are non-negative
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    epochs: Annotated[int, Field(gt=0)] | None = None  # None: the predictor's default
    promote: str | None = None                   # alias to move when the new version wins
    tracking_uri: str | None = None              # default: see r2ray.registry.configure_tracking
    experiment: str = "r2ray-train"


@dataclass
class TrainingData:
    table: pa.Table
    catalog: Catalog
    arrays: BenchArrays          # every query, embeddings attached
    encoder_spec: str | None     # the encoder that can embed new text for this predictor
    queries: pa.Table | None


@dataclass
class TrainResult:
    run_id: str
    version: VersionInfo
    metrics: dict[str, float]
    promotion: Promotion | None
    counts: dict[str, int]
    seconds: dict[str, float]    # wall time of each part of the job, in order
    selection: str | None = None  # the CV table, when the predictor was chosen by CV

    def report(self, wall_seconds: float | None = None) -> str:
        """``wall_seconds``: of the whole command; what the parts leave is start-up (imports)."""
        parts = self.seconds
        if wall_seconds is not None:
            parts = {"start-up": wall_seconds - sum(parts.values())} | parts
        lines = [f"trained {self.version.tags.get('kind', '?')} on {self.counts['train']:,} queries "
                 f"(validation {self.counts['validation']:,}, test {self.counts['test']:,})",
                 f"  test Brier {self.metrics['test_brier']:.4f}, log-token MAE "
                 f"{self.metrics['test_log_tokens_mae']:.4f}, calibration error "
                 f"{self.metrics['test_calibration_error']:.4f}",
                 f"  registered {self.version.uri} (run {self.run_id})"]
        if self.selection is not None:
            lines[1:1] = [f"  chosen by {self.version.tags.get('cv', 'cross-validation')} on the "
                          "training part:", *("    " + line for line in
                                               self.selection.splitlines())]
        if self.promotion is not None:
            lines.append(self.promotion.report())
        shares = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items())
        lines.append(f"  {sum(parts.values()):.1f} s in all ({shares})")
        return "\n".join(lines)


# ---- data ----------------------------------------------------------------------------------------
def bench_catalog(bench_uri: str, catalog_path: str | None) -> Catalog:
    """``catalog_path``, else the catalogue saved beside the (first) bench file, else the default."""
    from r2ray.bench.stats import catalog_for_bench

    return catalog_for_bench(storage.list_files(bench_uri, SUFFIXES)[0], catalog_path)[0]


def read_queries(uri: str) -> pa.Table:
    tables = [read_table(u).select(["query_id", "embedding"])
              for u in storage.list_files(uri, SUFFIXES)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def load_training_data(config: TrainConfig) -> TrainingData:
    catalog = bench_catalog(config.bench, config.catalog)
    table = read_bench(config.bench, catalog)
    queries = read_queries(config.queries) if config.queries else None
    arrays = bench_arrays(table, catalog, queries, source=config.bench)
    check_models_observed(arrays, catalog, config.bench)
    if arrays.embedding is None:
        encoder = load_encoder(config.encoder or MINILM)
        return TrainingData(table, catalog, arrays.with_embedding(
            embed_texts(encoder, arrays.query.tolist())), encoder.name, None)
    check_finite_embeddings(arrays, config.queries)
    if has_text_encoder(config.encoder):  # the user says these embeddings came from it: check
        check_embedding_dimension(arrays.embedding, load_encoder(config.encoder).dimension,
                                  f"{config.queries} (encoder {config.encoder!r})")
    return TrainingData(table, catalog, arrays, config.encoder, queries)


def check_models_observed(arrays: BenchArrays, catalog: Catalog, source: str) -> None:
    """Every catalogue model needs a row in the bench: the joint network would otherwise predict
    it from an untrained model embedding (a q̂ of about 0.5 the router acts on)."""
    missing = arrays.unobserved_models(catalog)
    if missing:
        raise R2RayError(f"{source}: no row of model(s) {', '.join(map(repr, missing))} of the "
                         "catalogue; drop them from --catalog (add one later with `r2ray train "
                         "--warm-start` and rows of it)")


def check_finite_embeddings(arrays: BenchArrays, source: str | None) -> None:
    """A NaN/inf embedding makes a fit NaN for every arm; name the first query that has one."""
    bad = np.flatnonzero(~np.isfinite(arrays.embedding).all(axis=1))
    if bad.size:
        first = str(arrays.query_id[bad[0]])
        raise R2RayError(f"{source}: the embedding of query_id {first!r} has NaN or infinite "
                         f"values ({bad.size} queries with one)")


def split_training_data(arrays: BenchArrays, config: TrainConfig) -> dict[str, np.ndarray]:
    """Row indices of train / validation / test; validation is carved from train only (none with
    ``select="cv"``: the cross-validation folds the whole training part)."""
    if arrays.n_queries < 2:
        raise too_few_queries(arrays.n_queries, "too few to split off a test set", config)
    train, test = split_indices(arrays, config.split, config.seed, config.test_fraction)
    if len(train) < needed_training_queries(config)[0]:
        raise too_few_queries(arrays.n_queries, f"the {config.split} split leaves {len(train)} "
                              f"for training ({len(test)} for test)", config)
    if config.select == "cv":
        return {"train": train, "validation": train[:0], "test": test}
    kept, validation = holdout_indices(len(train), config.validation_fraction, config.seed + 1)
    return {"train": train[kept], "validation": train[validation], "test": test}


def check_training_part_observes_models(parts: dict[str, BenchArrays], catalog: Catalog,
                                        config: TrainConfig) -> None:
    """The bench has a row of every model (:func:`check_models_observed`), but the split may put
    all of one model's rows outside the training part (a model run on one category only, that
    category held out): it would be predicted from nothing, as a model without rows is."""
    missing = parts["train"].unobserved_models(catalog)
    if missing:
        where = "the test and validation parts" if config.select == "none" else "the test part"
        raise R2RayError(f"{config.bench}: the training part ({config.split} split, seed "
                         f"{config.seed}) has no row of model(s) {', '.join(map(repr, missing))}: "
                         f"every row of it is in {where}; choose another --seed or --split, or "
                         "drop it from --catalog (add it later with `r2ray train --warm-start`)")


def needed_training_queries(config: TrainConfig) -> tuple[int, str]:
    """(training queries the fit needs, what needs them): with ``select="cv"``, every fold's fit
    set must hold 2 queries (the joint network carves its early-stopping set from it), so the
    fold sizes, which differ by one at most, leave n - ceil(n / folds) >= 2; else 2, one of them
    the early-stopping validation set."""
    if config.select == "cv":
        need = next(n for n in itertools.count(config.folds) if n - -(-n // config.folds) >= 2)
        return need, f"{config.folds}-fold cross-validation"
    return 2, "the early-stopping validation set"


def too_few_queries(n_queries: int, split: str, config: TrainConfig) -> R2RayError:
    """The error for a bench too small to train on: its size, the split's shares, what is needed
    and, for the random split, the smallest bench that has it."""
    need, why = needed_training_queries(config)
    if config.split == "random":
        smallest = next(n for n in itertools.count(2) if len(holdout_indices(
            n, config.test_fraction, 0)[0]) >= need)
        hint = f"a bench of at least {smallest} queries, with {config.test_fraction:.0%} for test"
    else:
        hint = "a bench with more queries outside the held-out category"
    queries = "1 query" if n_queries == 1 else f"{n_queries} queries"
    return R2RayError(f"{config.bench}: {queries}: {split}; {why} needs at least "
                      f"{need} there ({hint})")


def build_predictor(config: TrainConfig) -> BasePredictor:
    """``predictor`` with ``settings`` (``select="none"``), else the ``selected`` predictor over
    ``candidates``, ``settings`` applied to its candidates of kind ``predictor``. Built before
    any data is read: a bad setting or candidate name fails in a second, not after the embedding."""
    settings = config.settings | ({"epochs": config.epochs} if config.epochs else {})
    if config.select == "cv":
        from r2ray.predictor.selection import resolve_candidates

        overrides = {config.predictor: settings} if settings else {}
        resolve_candidates(config.candidates, overrides, config.seed)  # names, settings: checked
        selected = make_predictor("selected", candidates=config.candidates, folds=config.folds,
                                  seed=config.seed, overrides=overrides)
        if config.tune:
            from functools import partial

            from r2ray.tuning import asha_search

            selected.search = partial(asha_search, storage_path=config.tune_storage)
        return selected
    if config.tune:
        raise R2RayError("--tune searches the cross-validation's candidates: drop --select none "
                         "(or --predictor) to use it")
    predictor = make_predictor(config.predictor, **settings)
    if "seed" in predictor.settings() and "seed" not in settings:
        predictor.seed = config.seed
    return predictor


def log_selection(predictor: BasePredictor) -> str | None:
    """The CV table into the active MLflow run (``cv_selection.json``, ``cv_*`` metrics); its text."""
    import mlflow

    result = getattr(predictor, "cross_validation_", None)
    if result is None:
        return None
    columns = ["name", "kind", "audc", "audc_std"] + (
        ["audc_uncalibrated"] if result.measured_uncalibrated else []) + [
        "brier", "log_tokens_mae", "ece", "fit_seconds", "chosen"]
    mlflow.log_table({c: [row[c] for row in result.table] for c in columns}, "cv_selection.json")
    for row in result.table:
        mlflow.log_metrics({f"cv_{key}_{row['name']}": row[key]
                            for key in ("audc", "brier", "log_tokens_mae", "ece")})
    mlflow.log_params({"cv_winner": result.winner, "cv_candidates": ",".join(
        row["name"] for row in result.table), "cv_stopped_by_asha": ",".join(
        row["name"] for row in result.stopped) or "none"})
    text = result.report()
    mlflow.log_text(text + "\n", "cv_selection.txt")
    return text


# ---- evaluation for promotion --------------------------------------------------------------------
def evaluation_arrays(registered: RegisteredPredictor, data: TrainingData,
                      test_ids: np.ndarray) -> BenchArrays:
    """This run's test queries as seen by ``registered`` (its own catalogue and encoder)."""
    if registered.catalog.fingerprint == data.catalog.fingerprint:
        arrays = data.arrays
    else:
        arrays = bench_arrays(data.table, registered.catalog, data.queries)
    test = arrays.subset(np.flatnonzero(np.isin(arrays.query_id, test_ids)))
    if test.embedding is not None and same_encoder(registered, data.encoder_spec):
        return test
    encoder = model_encoder(registered.encoder_spec, registered.predictor.encoder_fingerprint,
                            registered.version.uri if registered.version else "the holder")
    if encoder is not None:
        return test.with_embedding(embed_texts(encoder, test.query.tolist()))
    raise ValueError(f"the holder was trained on embeddings from {registered.encoder_spec!r} and "
                     f"this run on {data.encoder_spec!r}; they cannot be scored on the same inputs")


def same_encoder(registered: RegisteredPredictor, encoder_spec: str | None) -> bool:
    """Whether ``registered`` was trained on embeddings of ``encoder_spec`` as it is here: the same
    spec and, for a text encoder, the same files (a holder saved before fingerprints were
    recorded is taken at its spec)."""
    recorded = registered.predictor.encoder_fingerprint
    return registered.encoder_spec == encoder_spec and (
        recorded is None or recorded == recorded_fingerprint(encoder_spec))


def log_training_queries(query_ids: np.ndarray) -> None:
    """The query ids this run fitted on (training and early-stopping parts, or a warm start's
    source's and new rows') into the active run, so a later run's promotion can leave them out
    of its comparison with this version (:func:`promote_on_unseen`)."""
    import mlflow

    mlflow.log_dict({"query_ids": sorted(set(map(str, query_ids)))}, TRAINING_QUERIES)


def training_query_ids(version: VersionInfo | None) -> np.ndarray | None:
    """The query ids ``version`` was fitted on, from its run; None where its run did not log them
    (a version registered before they were, or a warm start of such a version)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if version is None or version.run_id is None:
        return None
    try:
        document = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{TRAINING_QUERIES}")
    except (MlflowException, OSError):
        return None
    return np.asarray(document["query_ids"], dtype=str)


def promote_on_unseen(version: VersionInfo, alias: str, data: TrainingData, test_ids: np.ndarray,
                      candidate_score: dict) -> Promotion:
    """:func:`promote_if_better` on this run's test queries that the alias's holder was not fitted
    on. On its own training queries a holder wins from memory: retrained with another --seed (or
    on a grown bench, which splits anew), 48 of 60 test queries were the holder's training
    queries, and per_arm_ridge kept the alias on AUDC 0.765 vs 0.707, where on the other 12 the
    candidate led 0.887 vs 0.771. A holder whose run did not log its queries is compared on them
    all, as before."""
    holder = alias_holder(version.name, alias)
    seen = training_query_ids(holder)
    held_saw = np.zeros(len(test_ids), bool) if seen is None else np.isin(test_ids, seen)
    if not held_saw.any():
        return promote_if_better(version, alias, score_on_test(data, test_ids),
                                 candidate_score=candidate_score)
    unseen = test_ids[~held_saw]
    if not len(unseen):
        return Promotion(alias, version, holder, candidate_score, None, False,
                         f"the holder {holder.uri} was fitted on every test query of this run; "
                         "compare them with `r2ray evaluate` on a bench neither saw")
    promotion = promote_if_better(version, alias, score_on_test(data, unseen))
    if promotion.holder_score is None:   # refused before the two were compared
        return promotion
    return replace(promotion, reason=f"{promotion.reason}, on the {len(unseen)} of "
                                     f"{len(test_ids)} test queries the holder was not fitted on")


def score_on_test(data: TrainingData, test_ids: np.ndarray):
    from r2ray.evaluation.method_scores import score_predictor

    def score(registered: RegisteredPredictor) -> dict:
        test = evaluation_arrays(registered, data, test_ids)
        return score_predictor(registered.predictor, test, registered.catalog)

    return score


# ---- MLflow logging ------------------------------------------------------------------------------
def calibration_figure(bins: dict[str, np.ndarray], title: str):
    """Reliability diagram: mean observed quality against mean q̂ per bin (no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    keep = bins["count"] > 0
    axis.plot(bins["mean_predicted"][keep], bins["mean_observed"][keep], marker="o", label="test")
    axis.set(xlabel="predicted quality q̂", ylabel="observed quality", title=title,
             xlim=(0, 1), ylim=(0, 1))
    axis.legend()
    return figure


def log_fit(predictor: BasePredictor, data: TrainingData, test: BenchArrays,
            config: TrainConfig, counts: dict[str, int], seconds: float) -> dict[str, float]:
    """Params, metrics, per-arm table and calibration plot into the active MLflow run."""
    import mlflow

    prediction = predictor.predict(test.embedding)
    metrics = summary_metrics(prediction, test) | {"train_seconds": seconds}
    history = getattr(predictor, "history_", None)
    if history is not None:
        metrics |= {"epochs_run": history.epochs_run, "best_epoch": history.best_epoch}
        mlflow.log_param("precision_used", history.precision)
        for step, (train_loss, val_loss) in enumerate(zip(history.train_loss,
                                                          history.validation_loss), start=1):
            mlflow.log_metrics({"train_loss": train_loss, "validation_loss": val_loss}, step=step)
    mlflow.log_params(redact_values({**config.model_dump(exclude={"settings", "tracking_uri"}),
                       **{f"predictor.{k}": v for k, v in predictor.settings().items()},
                       **{f"n_{k}": v for k, v in counts.items()},
                       "encoder_used": data.encoder_spec, "n_arms": data.catalog.n_arms,
                       "catalog_fingerprint": data.catalog.fingerprint,
                       "data_fingerprint": predictor.data_fingerprint_}))
    mlflow.log_metrics(metrics)
    mlflow.log_table(per_arm_report(prediction, test, data.catalog), "per_arm_test_metrics.json")
    figure = calibration_figure(calibration_bins(prediction.quality, test.quality),
                                f"{predictor.name}: calibration on {test.n_queries:,} test queries")
    mlflow.log_figure(figure, "calibration.png")
    mlflow.log_dict(redact_values(config.model_dump()), "train_config.json")
    mlflow.log_text(redact_text(data.catalog.to_yaml()), "catalog.yaml")  # endpoints' credentials
    return metrics


# ---- the job -------------------------------------------------------------------------------------
@mlflow_guard()  # MLflow prints run links and errors with the tracking URI as given
def train_predictor_job(config: TrainConfig) -> TrainResult:
    """Fit, log, register and (optionally) promote; see the module docstring."""
    import mlflow

    started = time.perf_counter()
    configure_tracking(config.tracking_uri)
    predictor = build_predictor(config)
    data = load_training_data(config)
    seconds = {"read and embed": time.perf_counter() - started}
    rows = split_training_data(data.arrays, config)
    parts = {name: data.arrays.subset(index) for name, index in rows.items()}
    check_training_part_observes_models(parts, data.catalog, config)
    counts = {name: part.n_queries for name, part in parts.items()}
    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=f"{predictor.name}-{config.split}-seed{config.seed}") as run:
        fit_started = time.perf_counter()
        predictor.fit(parts["train"], data.catalog,
                      parts["validation"] if counts["validation"] else None)
        seconds["fit"] = time.perf_counter() - fit_started
        log.info("fitted %s in %.1f s", predictor.name, seconds["fit"])
        predictor.encoder_spec = data.encoder_spec
        predictor.encoder_fingerprint = recorded_fingerprint(data.encoder_spec)
        metrics = log_fit(predictor, data, parts["test"], config, counts, seconds["fit"])
        selection = log_selection(predictor)
        score = score_on_test(data, parts["test"].query_id)
        candidate_score = score(RegisteredPredictor(predictor, data.catalog, data.encoder_spec,
                                                    None))
        metrics |= {f"test_{k}": candidate_score[k] for k in ("audc", "qnc", "peak")}
        mlflow.log_metrics({f"test_{k}": candidate_score[k] for k in ("audc", "qnc", "peak")})
        tags = {"split": config.split, "seed": str(config.seed),
                "test_audc": f"{candidate_score['audc']:.6f}"}
        if selection is not None:
            tags |= {"winner": predictor.winner_name_, "cv": f"{config.folds}-fold CV"}
        version = register_predictor(predictor, config.registered_name, encoder_spec=data.encoder_spec,
                                     tags=tags)
        log_training_queries(np.concatenate([parts["train"].query_id,
                                             parts["validation"].query_id]))
        promotion = None
        if config.promote:
            promotion = promote_on_unseen(version, config.promote, data, parts["test"].query_id,
                                          candidate_score)
            mlflow.set_tag("promotion", promotion.report().splitlines()[0])
    seconds["score, log and register"] = time.perf_counter() - started - sum(seconds.values())
    return TrainResult(run.info.run_id, version, metrics, promotion, counts, seconds, selection)


def parse_settings(pairs: list[str]) -> dict:
    """``["monotone=budgets", "epochs=8"]`` → ``{"monotone": "budgets", "epochs": 8}`` (values are
    read as JSON where they parse, else kept as text)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise R2RayError(f"setting {pair!r} is not KEY=VALUE (e.g. monotone=budgets)")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


# ---- warm start: a new model added to a registered predictor --------------------------------------
class WarmStartConfig(BaseModel):
    """``r2ray train --warm-start``: extend a registered predictor to a catalogue with new models
    (:mod:`r2ray.predictor.extend`); saved with the run as ``warm_start_config.json``."""

    model_config = ConfigDict(extra="forbid")

    warm_start: str                              # models:/NAME@ALIAS, models:/NAME/VERSION, folder
    bench: str                                   # rows of the new model(s), long format
    catalog: str                                 # the extended catalogue
    registered_name: str | None = None           # default: the name of the version extended
    queries: str | None = None                   # table with query_id + embedding
    prior: Annotated[float, Field(ge=0, allow_inf_nan=False)] = DEFAULT_PRIOR  # pseudo-queries
    folds: Annotated[int, Field(ge=2)] = DEFAULT_FOLDS    # cross-fitting of the calibrations
    seed: Annotated[int, Field(ge=0)] = 0        # numpy seeds are non-negative
    promote: str | None = None
    tracking_uri: str | None = None
    experiment: str = "r2ray-train"


@dataclass
class WarmStartResult:
    run_id: str
    version: VersionInfo
    source: str                  # the warm-start URI as resolved (models:/NAME/VERSION or folder)
    kind: str                    # the extended predictor's kind (and winner, for ``selected``)
    extension: ExtensionReport
    promotion: Promotion | None

    def report(self) -> str:
        e = self.extension
        metrics = ", ".join(f"{k.removeprefix('new_arms_oof_')} {v:.4f}"
                            for k, v in e.out_of_fold.items()) or "none (one query)"
        lines = [f"extended {self.source} ({self.kind}) with {', '.join(e.new_models)} from "
                 f"{e.n_queries:,} queries ({e.n_cells:,} cells) in {e.seconds:.1f} s",
                 f"  new arms, {e.folds}-fold out of fold: {metrics}",
                 f"  registered {self.version.uri} (run {self.run_id})"]
        if e.ignored_cells:
            lines.insert(1, f"  {e.ignored_cells:,} cells of old models ignored: their arms are "
                            "frozen")
        if self.promotion is not None:
            lines.append(self.promotion.report())
        return "\n".join(lines)


def warm_start_rows(config: WarmStartConfig, registered: RegisteredPredictor
                    ) -> tuple[Catalog, BenchArrays]:
    """(the extended catalogue, checked against the registered one first, the new rows with
    embeddings from ``queries``, else from the registered predictor's own encoder)."""
    from r2ray.catalog import load_catalog
    from r2ray.predictor.extend import plan_extension

    catalog = load_catalog(config.catalog)
    plan_extension(registered.catalog, catalog)
    table = read_bench(config.bench, catalog)
    queries = read_queries(config.queries) if config.queries else None
    arrays = bench_arrays(table, catalog, queries, source=config.bench)
    if arrays.embedding is not None:
        check_finite_embeddings(arrays, config.queries)   # else "row N" of the kept rows only
        return catalog, arrays
    encoder = model_encoder(registered.encoder_spec, registered.predictor.encoder_fingerprint,
                            config.warm_start)
    if encoder is None:
        raise R2RayError(f"{config.warm_start} was trained on precomputed embeddings (encoder "
                         f"{registered.encoder_spec!r}): give --queries with an 'embedding' for "
                         "every query of the new rows")
    return catalog, arrays.with_embedding(embed_texts(encoder, arrays.query.tolist()))


def promote_extension(version: VersionInfo, alias: str, source: VersionInfo | None) -> Promotion:
    """Move ``alias`` to the extension when it has no holder or the holder is the version that was
    extended (its arms predict as before; the new model's are added). Any other holder is kept:
    the two were fitted on different data and need ``r2ray evaluate`` on a bench with every arm."""
    import mlflow

    holder = alias_holder(version.name, alias)
    if holder is None:
        promoted, reason = True, "no current holder"
    elif source is not None and (holder.name, holder.version) == (source.name, source.version):
        promoted, reason = True, "extends the holder: its arms predict as before"
    else:
        promoted = False
        reason = (f"the holder {holder.uri} is not the warm-start source; compare them with "
                  "`r2ray evaluate` on a bench with every arm")
    if promoted:
        mlflow.MlflowClient().set_registered_model_alias(version.name, alias, version.version)
    return Promotion(alias, version, holder, None, None, promoted, reason)


def log_extension(config: WarmStartConfig, extended: BasePredictor, report: ExtensionReport,
                  source: RegisteredPredictor) -> None:
    """Params, metrics and the catalogue of a warm start into the active MLflow run."""
    import mlflow

    winner = getattr(extended, "winner_name_", None)
    mlflow.log_params(redact_values({
        **config.model_dump(exclude={"tracking_uri"}), "kind": extended.name,
        "winner": winner or extended.name,
        "warm_start_version": source.version.uri if source.version else "folder",
        "new_models": ",".join(report.new_models), "n_new_queries": report.n_queries,
        "n_new_cells": report.n_cells, "n_ignored_old_cells": report.ignored_cells,
        "calibration_folds": report.folds, "n_arms": extended.catalog_.n_arms,
        "encoder_used": extended.encoder_spec,
        "catalog_fingerprint": extended.catalog_.fingerprint,
        "data_fingerprint": extended.data_fingerprint_,
        "spend_simulation": "the source's (old pool)"}))
    mlflow.log_metrics(report.out_of_fold | {"extend_seconds": report.seconds})
    mlflow.log_dict(redact_values(config.model_dump()), "warm_start_config.json")
    mlflow.log_text(redact_text(extended.catalog_.to_yaml()), "catalog.yaml")


@mlflow_guard()
def warm_start_job(config: WarmStartConfig) -> WarmStartResult:
    """Load the registered predictor, extend it with the new rows, log, register, promote."""
    import mlflow

    from r2ray.predictor.extend import extend_predictor

    configure_tracking(config.tracking_uri)
    source = load_registered(config.warm_start)
    name = config.registered_name or (source.version.name if source.version else None)
    if name is None:
        raise R2RayError(f"give --register NAME: {config.warm_start} is a folder, not a "
                         "registered version whose name the extension could take")
    catalog, rows = warm_start_rows(config, source)
    extended, report = extend_predictor(source.predictor, catalog, rows, prior=config.prior,
                                        folds=config.folds, seed=config.seed)
    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=f"warm-start-{'-'.join(report.new_models)}") as run:
        log_extension(config, extended, report, source)
        source_queries = training_query_ids(source.version)
        if source_queries is not None:   # its old arms were fitted on those, the new on the rows
            log_training_queries(np.concatenate([source_queries, rows.query_id]))
        source_uri = source.version.uri if source.version else config.warm_start
        version = register_predictor(extended, name,
                                     encoder_spec=extended.encoder_spec, tags={
                                         "warm_start": source_uri,
                                         "new_models": ",".join(report.new_models),
                                         "n_new_queries": str(report.n_queries)})
        promotion = (promote_extension(version, config.promote, source.version)
                     if config.promote else None)
        if promotion is not None:
            mlflow.set_tag("promotion", promotion.report().splitlines()[0])
    kind = extended.name + (f" → {extended.winner_name_}"
                            if getattr(extended, "winner_name_", None) else "")
    return WarmStartResult(run.info.run_id, version, source_uri, kind, report, promotion)
