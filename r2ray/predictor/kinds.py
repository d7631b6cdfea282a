"""The predictor registry: ``PREDICTORS`` maps each kind (the method names in ``metrics.json``
and configs) to what builds it; ``make_predictor`` builds one.

Every entry builds an object with ``fit(train, catalog, validation=None)`` and
``predict(embedding) -> ArmPredictions``. ``COMPOSITE`` entries are built from the others
(``stacked`` blends members with learned weights, ``averaged`` takes their plain mean,
``selected`` picks one by cross-validation); ``r2ray evaluate`` runs
them only when they are the model under test or named in ``--methods``.
"""

from __future__ import annotations

import inspect
import math
import numbers
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
        predictor = factory(**settings)
    except TypeError as err:
        raise PredictorError(f"predictor {name!r}: bad settings {sorted(settings)}: {err}") from None
    _check_setting_types(name, factory, settings)
    return predictor


def _check_setting_types(name: str, factory: Callable[..., BasePredictor], settings: dict) -> None:
    """A setting whose default is a number or a flag takes one of the same kind (a float one: any
    finite number): ``--set alpha=nan`` (read as text) or ``--set steps=2.5`` is an error naming
    the setting, not a numpy traceback in the middle of a fit."""
    defaults = inspect.signature(factory).parameters
    for key, value in settings.items():
        default = defaults[key].default if key in defaults else None
        if isinstance(default, bool):
            wanted, ok = "true or false", isinstance(value, bool)
        elif isinstance(default, numbers.Integral):
            wanted, ok = "a whole number", (isinstance(value, numbers.Integral)
                                            and not isinstance(value, bool))
        elif isinstance(default, numbers.Real):
            wanted, ok = "a finite number", (isinstance(value, numbers.Real)
                                             and not isinstance(value, bool)
                                             and math.isfinite(value))
        else:
            continue
        if not ok:
            raise PredictorError(f"predictor {name!r}: setting {key}={value!r} must be {wanted} "
                                 f"(default {default!r})")
