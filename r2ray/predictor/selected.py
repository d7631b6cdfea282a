"""``selected``: the predictor ``r2ray train`` registers by default — whichever candidate won a
K-fold cross-validation on the training data (:mod:`r2ray.predictor.selection`), refitted on all
of it. It predicts with the winner; its settings are the selection's (candidates, folds, seed), so
``r2ray evaluate`` re-runs the whole selection on each split's training part.
"""

from __future__ import annotations

import logging

import numpy as np

from r2ray.catalog import Catalog
from r2ray.predictor.base import ArmPredictions, BasePredictor, HeldOut
from r2ray.predictor.data import BenchArrays
from r2ray.predictor.selection import (COMPOSITES, CrossValidation, composite_members,
                                      cross_validate, resolve_candidates)

log = logging.getLogger(__name__)


class SelectedPredictor(BasePredictor):
    name = "selected"

    def __init__(self, candidates: str | list[str] = "small", folds: int = 3, seed: int = 0,
                 overrides: dict[str, dict] | None = None):
        self.candidates, self.folds, self.seed = candidates, folds, seed
        self.overrides = overrides or {}           # {registry key: settings} for its candidates
        self.search = None   # how candidates are fitted (selection.OutOfFoldSearch; not saved)
        self.winner_: BasePredictor | None = None
        self.winner_name_: str | None = None
        self.selection_: list[dict] | None = None  # the CV table
        self.cross_validation_: CrossValidation | None = None  # this fit's (not saved)

    def _fit(self, train: BenchArrays, x: np.ndarray, catalog: Catalog,
             validation: BenchArrays | None) -> None:
        candidates = resolve_candidates(self.candidates, self.overrides, self.seed)
        result = cross_validate(train, catalog, candidates, self.folds, self.seed, log.info,
                                search=self.search)
        chosen = next(c for c in result.candidates if c.name == result.winner)
        winner = chosen.build()
        if chosen.kind in COMPOSITES:  # from the members' out-of-fold predictions: no refits
            singles = [c for c in result.candidates if c.kind not in COMPOSITES]
            winner.member_out_of_fold = ([result.out_of_fold[c.name] for c in
                                          composite_members(chosen.kind, singles)], result.fold)
        winner.catalog_, winner.embedding_dim_ = catalog, int(x.shape[1])
        winner._fit(train, x, catalog, validation)
        self.winner_, self.winner_name_ = winner, chosen.name
        self.selection_, self.cross_validation_ = result.table, result
        self.out_of_fold_ = (train, result.out_of_fold[chosen.name], result.fold)

    @property
    def calibrates_quality(self) -> bool:
        """As the winner: a selected ``averaged`` keeps q̂ as its members' maps give it."""
        return self.winner_ is None or self.winner_.calibrates_quality

    def quality_chains(self, catalog: Catalog) -> list[np.ndarray]:
        """As the winner: a selected monotone network keeps one q̂ map per budget chain (with a
        map per arm, calibrated q̂ fell from one budget to the next on 4 % of a chain's steps,
        by up to 0.067, while the network's own q̂ never did)."""
        return [] if self.winner_ is None else self.winner_.quality_chains(catalog)

    def _held_out_predictions(self, train: BenchArrays, validation: BenchArrays | None
                              ) -> HeldOut:
        """The winner's out-of-fold predictions from the cross-validation (no refits), with its
        folds."""
        return self.out_of_fold_

    def _predict(self, x: np.ndarray) -> ArmPredictions:
        return self.winner_._predict(x)

    def predict(self, embedding: np.ndarray, raw_quality: bool = False) -> ArmPredictions:
        """As every predictor's; ``raw_quality`` with a winner that has no q̂ map of its own
        (``averaged``): the winner's q̂ before its members' maps, as it reports fitted alone (the
        selection has no map to leave out, so the base class would return the calibrated q̂)."""
        if not raw_quality or self.calibrates_quality:
            return super().predict(embedding, raw_quality)
        return ArmPredictions(self.winner_.predict(embedding, raw_quality=True).quality,
                              super().predict(embedding).output_tokens)

    def _fitted_tensors(self) -> tuple[dict, dict[str, np.ndarray]]:
        fitted, tensors = self.winner_._fitted_tensors()
        return {"winner": self.winner_name_, "kind": self.winner_.name,
                "settings": self.winner_.settings(), "fitted": fitted,
                "selection": self.selection_}, tensors

    def _restore(self, fitted: dict, tensors: dict[str, np.ndarray]) -> None:
        from r2ray.predictor import make_predictor

        winner = make_predictor(fitted["kind"], **fitted["settings"])
        winner.catalog_, winner.embedding_dim_ = self.catalog_, self.embedding_dim_
        winner._restore(fitted["fitted"], tensors)
        self.winner_, self.winner_name_ = winner, fitted["winner"]
        self.selection_ = fitted["selection"]
