"""``averaged``: the plain mean of member predictors, each as the router sees it (calibrated).

Why not learned weights: on the benches of ``benchmarks/small_data.py`` (ParetoBandit and
RouterArena in ``../shared/data``, their small copies in ``tests/data``, the synthetic world and
the other world) the equal-weight mean of per-arm Ridge, CARROT KNN on every arm and the joint
network scored at or near the best single method on each, while the stack's weights, fitted on
a few hundred out-of-fold queries, followed noise (see ``docs/design.md``). The members err in
different ways (linear, local, jointly conditioned), so their mean cancels part of each one's error
without estimating anything.

Per cell: q̂ is the mean of the members' calibrated q̂ and t̂ the mean of their calibrated t̂
(each a mean number of tokens, so the mean of them is one too, and cost stays unbiased); a member
without a prediction (NaN) is left out of that cell's mean. The average's own token calibration
and spend simulation are fitted like every predictor's, on held-out predictions: here the mean of
the members' out-of-fold predictions, each corrected by calibrations cross-fitted over those rows
(:func:`~r2ray.predictor.base.router_view`, by the members' folds; each member's q̂ mapped along
that member's budget chains, as it predicts: a monotone network's chains share one map). Its q̂
gets no map of its own (``calibrates_quality``): a second isotonic map on top of the members' ones, fitted on a few
hundred held-out queries, cost 0.002-0.003 AUDC on the small real benches (measured). The members
are fitted on all of ``train``, their calibrations on the same out-of-fold predictions
(the calibrations' folds, :func:`~r2ray.predictor.base.model_fold_ids`), so there are no further
refits, and cross-validation, which already has those predictions, hands them over with its
folds (``member_out_of_fold``): every spend simulation's view is cross-fitted by the folds that
made its predictions.
"""

from __future__ import annotations

import numpy as np

from r2ray.catalog import Catalog
from r2ray.predictor.base import (CALIBRATION_FOLDS, ArmPredictions, BasePredictor, HeldOut,
                                  PredictorError, model_fold_ids, out_of_fold, router_view)
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.stacked import blend, member_factory

DEFAULT_MEMBERS = ({"kind": "per_arm_ridge"}, {"kind": "carrot_knn_all"}, {"kind": "r2ray"})


def mean_of(members: list[ArmPredictions]) -> ArmPredictions:
    """Per cell, the mean of q̂ and of t̂ over the members with a finite value; NaN where none
    has one: the stack's blend (:func:`r2ray.predictor.stacked.blend`) at equal weights."""
    k = members[0].quality.shape[1]
    equal = np.full((k, len(members)), 1.0 / len(members))
    return ArmPredictions(blend([m.quality for m in members], equal),
                          blend([m.output_tokens for m in members], equal))


def averaged_out_of_fold(members: list[ArmPredictions], rows: BenchArrays,
                         catalog: Catalog, folds: np.ndarray | None = None,
                         chains: list[list[np.ndarray]] | None = None) -> ArmPredictions:
    """The average's held-out predictions from its members' uncorrected out-of-fold ones
    (``folds``: :func:`~r2ray.predictor.base.router_view`'s; ``chains``: each member's budget
    chains, :meth:`BasePredictor.quality_chains`, so a monotone member is viewed with the q̂
    maps it predicts with)."""
    chains = chains or [[] for _ in members]
    return mean_of([router_view(p, rows, catalog, folds=folds, chains=c)
                    for p, c in zip(members, chains)])


class AveragedPredictor(BasePredictor):
    """The mean of ``members`` (``[{"kind": ..., "settings": {...}}, ...]``, default: per-arm
    Ridge, CARROT KNN on every arm, the joint network), each with its own calibrations."""

    name = "averaged"
    calibrates_quality = False

    def __init__(self, members: list[dict] | None = None, seed: int = 0):
        self.members = ([dict(m) for m in DEFAULT_MEMBERS] if members is None
                        else members)
        self.seed = seed
        self.members_: list[BasePredictor] | None = None
        self.member_out_of_fold: tuple[list[ArmPredictions], np.ndarray] | None = None
        # (the members' out-of-fold predictions, the [N] folds that made them): cross-validation's

    def _member(self, member: dict) -> BasePredictor:
        """A fresh member; one with a ``seed`` setting it was not given gets the average's."""
        return member_factory(member, self.seed)()

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        if not self.members:
            raise PredictorError("averaged: no members to average; give at least one "
                                 "{'kind': ..., 'settings': {...}}")
        given, self.member_out_of_fold = self.member_out_of_fold, None
        if given is None:
            folds = model_fold_ids(train, catalog, CALIBRATION_FOLDS)
            oof = [out_of_fold(lambda m=m: self._member(m), train, catalog, folds)
                   for m in self.members]
        else:
            oof, folds = given
        self.members_ = [self._member(m).fit(train, catalog, validation,
                                             held_out=(train, p, folds))
                         for m, p in zip(self.members, oof)]
        self.held_out_parts_ = (oof, folds)   # what the held-out view is made of (not saved)

    def _held_out_predictions(self, train: BenchArrays, validation: BenchArrays | None
                              ) -> HeldOut:
        """The average of the members' out-of-fold predictions of the fit (no refits), with their
        folds: made here, when asked, not in the fit (a selection that chose the average has it
        from its cross-validation already, and never asks)."""
        oof, folds = self.held_out_parts_
        chains = [m.quality_chains(self.catalog_) for m in self.members_]
        return train, averaged_out_of_fold(oof, train, self.catalog_, folds, chains), folds

    def _predict(self, x: np.ndarray, raw_quality: bool = False) -> ArmPredictions:
        return mean_of([m.predict(x, raw_quality=raw_quality) for m in self.members_])

    def predict(self, embedding: np.ndarray, raw_quality: bool = False) -> ArmPredictions:
        """As every predictor's; ``raw_quality``: the mean of the members' q̂ before their own
        maps (the average has none of its own)."""
        if not raw_quality:
            return super().predict(embedding)
        calibrated = super().predict(embedding)
        x = np.asarray(embedding, dtype=np.float32)
        return ArmPredictions(self._predict(x, raw_quality=True).quality,
                              calibrated.output_tokens)

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        fitted, tensors = {"members": []}, {}
        for i, member in enumerate(self.members_):
            config, member_tensors = member.state()     # with the member's calibrations
            fitted["members"].append(config)
            tensors |= {f"member{i}.{name}": value for name, value in member_tensors.items()}
        return fitted, tensors

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        self.members_ = []
        for i, (member, config) in enumerate(zip(self.members, fitted["members"])):
            prefix = f"member{i}."
            own = {n.removeprefix(prefix): v for n, v in tensors.items() if n.startswith(prefix)}
            self.members_.append(self._member(member).load_state(config, own, self.catalog_))
