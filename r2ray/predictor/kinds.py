"""The predictor registry: ``PREDICTORS`` maps each kind (the method names in ``metrics.json``
and configs) to what builds it; ``make_predictor`` builds one.

Every entry builds an object with ``fit(train, catalog, validation=None)`` and
``predict(embedding) -> ArmPredictions``. ``COMPOSITE`` entries are built from the others
(``stacked`` blends members with learned weights, ``averaged`` takes their plain mean,
``selected`` picks one by cross-validation); ``r2ray evaluate`` runs
them only when they are the model under test or named in ``--methods``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from r2ray.predictor.averaged import AveragedPredictor
from r2ray.predictor.base import BasePredictor, PredictorError
from r2ray.predictor.carrot import CarrotKNN, CarrotLinear
from r2ray.predictor.joint import R2RayPredictor
from r2ray.predictor.per_arm import PerArmMLP, PerArmRidge
from r2ray.predictor.residual import ResidualPredictor
from r2ray.predictor.selected import SelectedPredictor
from r2ray.predictor.stacked import StackedPredictor

PREDICTORS: dict[str, Callable[..., BasePredictor]] = {
    "r2ray": R2RayPredictor,
    "per_arm_mlp": PerArmMLP,
    "per_arm_ridge": PerArmRidge,
    "r2ray_residual": ResidualPredictor,
    "carrot_knn_default": partial(CarrotKNN, arms="default"),
    "carrot_linear_default": partial(CarrotLinear, arms="default"),
    "carrot_knn_all": partial(CarrotKNN, arms="all"),
    "carrot_linear_all": partial(CarrotLinear, arms="all"),
    "stacked": StackedPredictor,
    "averaged": AveragedPredictor,
    "selected": SelectedPredictor,
}
COMPOSITE = ("stacked", "averaged", "selected")


def make_predictor(name: str, **settings) -> BasePredictor:
    """A new, unfitted predictor from the registry; unknown settings are an error naming them."""
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise PredictorError(f"unknown predictor {name!r}; choose one of "
                             f"{', '.join(PREDICTORS)}") from None
    try:
        return factory(**settings)
    except TypeError as err:
        raise PredictorError(f"predictor {name!r}: bad settings {sorted(settings)}: {err}") from None
