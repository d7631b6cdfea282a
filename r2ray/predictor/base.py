"""The one predictor interface: ``fit(train, catalog, validation) -> self``, ``predict(embedding)``.

Every method (the jointly conditioned network and each baseline) predicts, for every query and
every arm in ``catalog.arms`` order, the quality q̂ ∈ [0, 1] and the output tokens t̂; cost follows
from the catalogue prices. t̂ is a mean, at most the arm's cap, not the geometric-type centre a
log-space fit gives (:mod:`r2ray.predictor.token_calibration`, fitted on held-out rows in ``fit``);
q̂ is mapped per model by an isotonic calibration fitted on the same rows
(:mod:`r2ray.predictor.quality_calibration`).
NaN marks an arm a method does not cover (default-only baselines). Learned state lives in
``state()``: a JSON-able config plus named float arrays, so saving never pickles an object (see
:mod:`r2ray.predictor.persist`).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from r2ray.catalog import DEFAULT_BUDGET, Catalog
from r2ray.encoders import check_embedding_dimension
from r2ray.errors import R2RayError
from r2ray.predictor.data import BenchArrays, holdout_indices
from r2ray.predictor.quality_calibration import (QualityCalibration, cross_fitted_quality,
                                                 fit_quality_calibration)
from r2ray.predictor.spend_guarantee import SpendSimulation, simulate_spend
from r2ray.predictor.token_calibration import (TokenCalibration, cross_fitted_mean_tokens,
                                               fit_token_calibration)
from r2ray.routing import call_cost_usd

CALIBRATION_FOLDS = 3  # cross-fitting folds for the calibrations when no validation set
FOLD_SEED = 0  # the order of every query fold: calibration's and cross-validation's (see fold_ids)


class PredictorError(R2RayError, ValueError):
    """A predictor used wrongly: not fitted, no embeddings, data that does not match."""


@dataclass(frozen=True)
class ArmPredictions:
    quality: np.ndarray        # [N, K] float32 in [0, 1]; NaN = arm not covered
    output_tokens: np.ndarray  # [N, K] float32, tokens; NaN = arm not covered

    def cost_usd(self, catalog: Catalog, input_tokens: np.ndarray) -> np.ndarray:
        """[N, K] float64 USD ĉ: :func:`r2ray.routing.call_cost_usd` of input tokens [N] and the
        predicted output tokens."""
        return call_cost_usd(catalog, input_tokens, self.output_tokens)

    def subset(self, index: np.ndarray) -> ArmPredictions:
        return ArmPredictions(self.quality[index], self.output_tokens[index])


# (held-out rows, their uncorrected predictions [M, K] by fits that never saw them, the [M] fold
# of the fit that made each row's prediction, or None where one fit made them all)
HeldOut = tuple[BenchArrays, ArmPredictions, np.ndarray | None]


class Predictor(Protocol):
    name: str

    def fit(self, train: BenchArrays, catalog: Catalog,
            validation: BenchArrays | None = None) -> Predictor: ...

    def predict(self, embedding: np.ndarray) -> ArmPredictions: ...

    def state(self) -> tuple[dict, dict[str, np.ndarray]]: ...


def training_embedding(arrays: BenchArrays, role: str = "train") -> np.ndarray:
    """The [N, D] embeddings of a training set, or a clear error when they were never attached."""
    if arrays.embedding is None:
        raise PredictorError(
            f"the {role} set has no query embeddings; attach them with "
            "BenchArrays.with_embedding(load_encoder().encode(list(arrays.query))) or read the "
            "bench with a queries table that has an 'embedding' column")
    if arrays.n_queries == 0:
        raise PredictorError(f"the {role} set has no queries")
    return np.asarray(arrays.embedding, dtype=np.float32)


def default_arm_mask(catalog: Catalog) -> np.ndarray:
    """[K] bool: the arm is a model's default (no length instruction)."""
    return catalog.arm_arrays["budget_tokens"] == DEFAULT_BUDGET


def log_tokens(output_tokens: np.ndarray) -> np.ndarray:
    """Regression target for output tokens: log(1 + tokens); NaN stays NaN."""
    return np.log1p(np.maximum(output_tokens, 0.0)).astype(np.float32)


def tokens_from_log(log_output_tokens: np.ndarray) -> np.ndarray:
    return np.expm1(np.clip(log_output_tokens, 0.0, 20.0)).astype(np.float32)


def expand_arms(values: np.ndarray, arms: np.ndarray, n_arms: int) -> np.ndarray:
    """[N, len(arms)] → [N, K] with NaN in the arms a method does not cover."""
    out = np.full((values.shape[0], n_arms), np.nan, dtype=np.float32)
    out[:, arms] = values
    return out


def require_fitted(state: object, name: str) -> None:
    if state is None:
        raise PredictorError(f"{name}: call fit() (or load_predictor) before predict()")


def check_catalog(arrays: BenchArrays, catalog: Catalog, role: str = "train") -> None:
    if arrays.quality.shape[1] != catalog.n_arms:
        raise PredictorError(f"the {role} set has {arrays.quality.shape[1]} arms but the "
                             f"catalogue has {catalog.n_arms}; build both from the same catalogue")
    if not arrays.mask.any(axis=0).any():
        raise PredictorError(f"the {role} set has no observed outcome in any arm")


class BasePredictor:
    """Shared plumbing: settings from the constructor, fitted metadata, save/restore of state.

    Subclasses set ``name``, store their settings in ``__init__`` (nothing else happens there) and
    implement ``_fit``, ``_predict``, ``_fitted_tensors`` and ``_restore``. Fitted attributes end
    in ``_``: ``catalog_``, ``embedding_dim_``, ``data_fingerprint_``, ``token_calibration_``,
    ``quality_calibration_``, ``spend_simulation_``.
    """

    name = ""
    catalog_: Catalog | None = None
    embedding_dim_: int | None = None
    data_fingerprint_: str | None = None
    token_calibration_: TokenCalibration | None = None  # None: t̂ as the log-space fit gives it
    quality_calibration_: QualityCalibration | None = None  # None: q̂ as the fit gives it
    spend_simulation_: SpendSimulation | None = None    # None: no spend guarantee possible
    encoder_spec: str | None = None  # the encoder that produced the training embeddings, if known
    encoder_fingerprint: str | None = None  # that encoder's files (encoders.encoder_fingerprint)
    saved_fingerprint_: str | None = None  # the document_sha256 of the folder it was loaded from
                                            # (persist.document_digest); None: not loaded
    calibrates_quality = True  # False: q̂ is used as the fit gives it (``averaged``: the members'
                               # own maps already apply)

    def settings(self) -> dict:
        """Constructor arguments as given (JSON-able), the way scikit-learn's get_params works."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def fit(self, train: BenchArrays, catalog: Catalog, validation: BenchArrays | None = None,
            held_out: HeldOut | None = None) -> BasePredictor:
        """Fit on ``train``; then the token and quality calibrations and the spend simulation on
        held-out rows: ``held_out`` = (rows, their uncorrected predictions by fits that never saw
        them, the [M] folds of those fits or None for one fit) when the caller has them
        (cross-validation's out-of-fold predictions), else the validation set, else cross-fitted
        copies (:meth:`_held_out_predictions`)."""
        x = training_embedding(train)   # NaN/inf rows would make every arm's fit NaN, silently
        check_embedding_dimension(x, x.shape[1], f"{self.name}.fit(train=...)")
        check_catalog(train, catalog)
        if validation is not None:
            check_catalog(validation, catalog, "validation")
            check_embedding_dimension(training_embedding(validation, "validation"), x.shape[1],
                                      f"{self.name}.fit(validation=...)")
        self.catalog_, self.embedding_dim_ = catalog, int(x.shape[1])
        self.data_fingerprint_ = data_fingerprint(train)
        self._fit(train, x, catalog, validation)
        rows, predicted, folds = held_out or self._held_out_predictions(train, validation)
        self.fit_calibrations(rows, predicted, catalog, folds)
        return self

    def fit_calibrations(self, held_out: BenchArrays, predicted: ArmPredictions,
                         catalog: Catalog, folds: np.ndarray | None = None) -> None:
        """Token and quality calibration from held-out rows and their uncorrected predictions;
        the spend simulation on the same rows, each corrected by calibrations cross-fitted over
        them (what the router would have seen): by ``folds`` [M], the folds whose models made
        ``predicted``, so no fold's rows are mapped by a calibration fitted on that fold model's
        predictions (a third of each map's rows were, with two random halves: κ sized on an
        optimistic view); None (a validation set, one fit): two random halves."""
        self.token_calibration_ = fit_token_calibration(
            predicted.output_tokens, held_out.output_tokens, catalog)
        chains = self.quality_chains(catalog)
        self.quality_calibration_ = (fit_quality_calibration(
            predicted.quality, held_out.quality, catalog, chains=chains)
            if self.calibrates_quality else None)
        seen = router_view(predicted, held_out, catalog, self.calibrates_quality, folds, chains)
        self.spend_simulation_ = simulate_spend(
            seen.quality, call_cost_usd(catalog, held_out.input_tokens, seen.output_tokens),
            held_out.quality, held_out.cost_usd)

    def quality_chains(self, catalog: Catalog) -> list[np.ndarray]:
        """The budget chains along which this predictor's q̂ never falls (its ``monotone``
        setting, where it has one), so the q̂ calibration gives each chain one map."""
        monotone = getattr(self, "monotone", "none")
        if monotone == "none":
            return []
        from r2ray.predictor.network import budget_chains  # torch: only a monotone fit pays

        return budget_chains(catalog, monotone)

    def predict(self, embedding: np.ndarray, raw_quality: bool = False) -> ArmPredictions:
        """q̂ and t̂ [N, K] as the router uses them; ``raw_quality``: q̂ before its calibration
        (for reporting how much the calibration changed)."""
        require_fitted(self.embedding_dim_, self.name)
        x = check_embedding_dimension(embedding, self.embedding_dim_, f"{self.name}.predict")
        prediction = self._predict(x)
        quality, tokens = prediction.quality, prediction.output_tokens
        if self.quality_calibration_ is not None and not raw_quality:
            quality = self.quality_calibration_.apply(quality)
        if self.token_calibration_ is not None:
            tokens = self.token_calibration_.mean_tokens(tokens)
        return ArmPredictions(quality, tokens)

    def _held_out_predictions(self, train: BenchArrays, validation: BenchArrays | None
                              ) -> HeldOut:
        """(held-out rows, their uncorrected predictions [M, K], their folds [M] or None) for rows
        the fitted state never saw: the validation set when given (one fit: None), else
        ``CALIBRATION_FOLDS``-fold cross-fitted copies."""
        if validation is not None:
            return validation, self._predict(validation.embedding), None
        folds = model_fold_ids(train, self.catalog_, CALIBRATION_FOLDS)
        return train, out_of_fold(lambda: type(self)(**self.settings()), train, self.catalog_,
                                  folds), folds

    # ---- persistence: a JSON-able dict plus named arrays, never pickles -------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        require_fitted(self.embedding_dim_, self.name)
        fitted, tensors = self._fitted_tensors()
        calibration, simulation = self.token_calibration_, self.spend_simulation_
        quality = self.quality_calibration_
        return {"settings": self.settings(), "fitted": fitted, "embedding_dim": self.embedding_dim_,
                "token_calibration": calibration.to_json() if calibration else None,
                "quality_calibration": quality.to_json() if quality else None,
                "spend_simulation": simulation.to_json() if simulation else None}, tensors

    def load_state(self, config: dict, tensors: dict[str, np.ndarray],
                   catalog: Catalog) -> BasePredictor:
        """Restore what :meth:`state` returned (on an instance built with the same settings)."""
        self.catalog_, self.embedding_dim_ = catalog, int(config["embedding_dim"])
        self._restore(config["fitted"], tensors)
        calibration = config.get("token_calibration")  # absent in predictors saved before it
        self.token_calibration_ = TokenCalibration.from_json(calibration) if calibration else None
        quality = config.get("quality_calibration")  # absent in predictors saved before it
        self.quality_calibration_ = QualityCalibration.from_json(quality) if quality else None
        simulation = config.get("spend_simulation")  # absent in predictors saved before it
        self.spend_simulation_ = SpendSimulation.from_json(simulation) if simulation else None
        return self

    # ---- subclass hooks --------------------------------------------------------------------------
    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        raise NotImplementedError

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        raise NotImplementedError

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        raise NotImplementedError

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        raise NotImplementedError


def router_view(predicted: ArmPredictions, rows: BenchArrays, catalog: Catalog,
                calibrate_quality: bool = True, folds: np.ndarray | None = None,
                chains: list[np.ndarray] = ()) -> ArmPredictions:
    """Held-out predictions of ``rows`` corrected as the router would see them: by token (and
    quality) calibrations cross-fitted over the same rows, so no row is corrected by a map
    fitted on its own outcome. ``folds`` [M]: the folds whose models made ``predicted`` (out of
    fold): each fold is then corrected by maps fitted on the other folds' rows only, as the
    router's maps never saw the refitted model's predictions; None: two seeded random folds.
    ``chains``: the predictor's budget chains (:meth:`BasePredictor.quality_chains`)."""
    split = 2 if folds is None else folds
    quality = (cross_fitted_quality(predicted.quality, rows.quality, catalog, split,
                                    chains=chains)
               if calibrate_quality else predicted.quality)
    return ArmPredictions(quality, cross_fitted_mean_tokens(predicted.output_tokens,
                                                            rows.output_tokens, catalog, split))


def fold_ids(n_queries: int, folds: int, seed: int = FOLD_SEED) -> np.ndarray:
    """[N] fold of each query: balanced (sizes differ by at most one), seeded order. The
    calibrations and the cross-validation both use ``FOLD_SEED``: a candidate the selection picks
    is then calibrated on exactly the out-of-fold predictions its plain fit would make, so
    ``selected`` predicts as the winner fitted alone (not one fold draw's worth of noise apart)."""
    return (np.arange(n_queries) % folds)[np.random.default_rng(seed).permutation(n_queries)]


def model_presence(rows: BenchArrays, catalog: Catalog) -> np.ndarray:
    """[N, M] bool: the query has an outcome of the model (on any of its arms)."""
    model = catalog.arm_arrays["model_index"]
    return np.stack([rows.mask[:, model == m].any(axis=1)
                     for m in range(len(catalog.model_names))], axis=1)


def fold_counts(presence: np.ndarray, fold: np.ndarray, folds: int) -> np.ndarray:
    """[M, folds] queries of each model in each fold."""
    return np.stack([presence[fold == f].sum(axis=0) for f in range(folds)], axis=1)


def model_fold_ids(train: BenchArrays, catalog: Catalog, folds: int,
                   seed: int = FOLD_SEED) -> np.ndarray:
    """:func:`fold_ids`, with pairs of queries swapped between folds (sizes kept) until every
    model with outcomes in two or more queries has them in two or more folds: each fold's fit then
    sees every such model, instead of predicting its held-out rows from none of its outcomes (a
    model run on a few queries, all dealt to one fold). Exactly :func:`fold_ids` where no model's
    queries lie in one fold; a model with one query stays where it is
    (:func:`r2ray.predictor.selection.check_folds_see_models` names it). ``seed``: fold_ids'."""
    fold = fold_ids(train.n_queries, folds, seed)
    presence = model_presence(train, catalog)
    for m in np.flatnonzero(presence.sum(axis=0) >= 2):
        counts = fold_counts(presence, fold, folds)
        if (counts[m] > 0).sum() == 1:
            swap = spreading_swap(m, presence, fold, counts)
            if swap is not None:
                fold[list(swap)] = fold[list(swap[::-1])]
    return fold


def check_fold_count(n_queries: int, folds: int, who: str) -> None:
    """A ``folds``-fold cross-validation needs ``folds`` training queries: with fewer,
    :func:`fold_ids` deals only as many folds as there are queries, and the fit ran on fewer folds
    than asked, in silence (5 folds on 2 queries: 2 folds of one query each)."""
    if n_queries < folds:
        raise PredictorError(f"{who}: {folds}-fold cross-validation needs at least {folds} "
                             f"training queries, the train set has {n_queries}; ask for fewer "
                             "folds or use a larger bench")


def spreading_swap(m: int, presence: np.ndarray, fold: np.ndarray,
                   counts: np.ndarray) -> tuple[int, int] | None:
    """(query of model ``m``, query of another fold) whose exchange spreads ``m`` over two folds
    and leaves every already spread model spread; None if no such pair."""
    spread = (counts > 0).sum(axis=1) >= 2
    home = fold[presence[:, m]][0]
    for i in np.flatnonzero(presence[:, m]):
        for j in np.flatnonzero(fold != home):
            after = counts.copy()
            after[presence[i], home] -= 1
            after[presence[i], fold[j]] += 1
            after[presence[j], fold[j]] -= 1
            after[presence[j], home] += 1
            now = (after > 0).sum(axis=1) >= 2
            if now[m] and not (spread & ~now).any():
                return int(i), int(j)
    return None


def out_of_fold(make: Callable[[], BasePredictor], train: BenchArrays, catalog: Catalog,
                folds: np.ndarray) -> ArmPredictions:
    """Uncorrected predictions [N, K] for every row of ``train`` by a fresh ``make()`` fitted
    (``_fit`` only: no calibrations) on the rows of the other folds."""
    if len(np.unique(folds)) < 2:   # else the one fold's fit has no rows: "no queries"
        raise PredictorError(
            f"cross-fitting needs training queries in two folds at least, the train set has "
            f"{train.n_queries} quer{'y' if train.n_queries == 1 else 'ies'}: each row is "
            "predicted by a fit on the other folds' rows (the calibrations', the stack's, the "
            "average's), so use a bench of 2 queries or more")
    quality = np.full(train.quality.shape, np.nan, dtype=np.float32)
    tokens_hat = np.full(train.output_tokens.shape, np.nan, dtype=np.float32)
    for fold in np.unique(folds):
        rows, predicted = fold_predictions(make, train, catalog, folds, fold)
        quality[rows], tokens_hat[rows] = predicted.quality, predicted.output_tokens
    return ArmPredictions(quality, tokens_hat)


def fold_predictions(make: Callable[[], BasePredictor], train: BenchArrays, catalog: Catalog,
                     folds: np.ndarray, fold) -> tuple[np.ndarray, ArmPredictions]:
    """(rows of ``fold``, uncorrected predictions there by a fresh ``make()`` fitted on the
    other folds' rows)."""
    part = train.subset(np.flatnonzero(folds != fold))
    copy = make()
    x = training_embedding(part)
    copy.catalog_, copy.embedding_dim_ = catalog, int(x.shape[1])
    copy._fit(part, x, catalog, None)
    rows = np.flatnonzero(folds == fold)
    return rows, copy._predict(train.embedding[rows])


def data_fingerprint(arrays: BenchArrays) -> str:
    """sha256 over query ids, outcomes and embedding shape: which data a predictor was fitted on."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, arrays.query_id)).encode())
    for values in (arrays.quality, arrays.output_tokens):
        digest.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    if arrays.embedding is not None:
        digest.update(str(arrays.embedding.shape).encode())
    return digest.hexdigest()


def carve_validation(train: BenchArrays, validation: BenchArrays | None, fraction: float,
                     seed: int) -> tuple[BenchArrays, BenchArrays]:
    """(fit set, early-stopping set): the given validation set, else a seeded slice of ``train``.
    One query cannot be cut in two: say why the fit has one (a 2-query training set cross-fitted
    for the calibrations), not that "the bench" needs 2 when it has more."""
    if validation is not None:
        return train, validation
    if train.n_queries < 2:
        raise PredictorError(f"a network fitted on {train.n_queries} query has none left for its "
                             "early-stopping set: without a validation set it needs at least 3 "
                             f"training queries (its calibrations are cross-fitted over "
                             f"{CALIBRATION_FOLDS} folds, each fitted on the others); use a "
                             "larger bench or a per_arm_ridge / carrot predictor")
    kept, held_out = holdout_indices(train.n_queries, fraction, seed)
    return train.subset(kept), train.subset(held_out)


def column_means(values: np.ndarray, fallback: float) -> np.ndarray:
    """[K] mean of each column over non-NaN cells; ``fallback`` for a column with none."""
    observed = ~np.isnan(values)
    counts = observed.sum(axis=0)
    sums = np.where(observed, values, 0.0).sum(axis=0, dtype=np.float64)
    return np.where(counts > 0, sums / np.maximum(counts, 1), fallback).astype(np.float32)
