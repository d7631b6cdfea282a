"""The predictor registry: ``PREDICTORS`` maps each kind (the method names in ``metrics.json``
and configs) to what builds it; ``make_predictor`` builds one.

Every entry builds an object with ``fit(train, catalog, validation=None)`` and
``predict(embedding) -> ArmPredictions``. ``COMPOSITE`` entries are built from the others
(``stacked`` blends members with learned weights, ``averaged`` takes their plain mean,
``selected`` picks one by cross-validation); ``r2ray evaluate`` runs
them only when they are the model under test or named in ``--methods``.
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
import typing
from collections.abc import Callable
from functools import partial
from typing import Annotated, Literal

import numpy as np
from pydantic import (ConfigDict, Field, NonNegativeInt, PositiveInt, TypeAdapter,
                      ValidationError)

from r2ray.encoders import PRECISIONS
from r2ray.predictor.averaged import AveragedPredictor
from r2ray.predictor.base import BasePredictor, PredictorError
from r2ray.predictor.carrot import ARM_SETS, CarrotKNN, CarrotLinear
from r2ray.predictor.joint import R2RayPredictor
from r2ray.predictor.network import MONOTONE_OPTIONS
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

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FOLDS = Annotated[int, Field(ge=2)]        # a K-fold split needs two folds at least
SETTING_RULES = {   # setting name → the values it takes, whichever predictor has it
    "alpha": Annotated[FiniteFloat, Field(gt=0)],   # ridge penalty: 0 is a singular solve
    "l2": Annotated[FiniteFloat, Field(ge=0)],      # logistic L2 penalty
    "dropout": Annotated[FiniteFloat, Field(ge=0, lt=1)],
    "learning_rate": Annotated[FiniteFloat, Field(gt=0)],
    "weight_decay": Annotated[FiniteFloat, Field(ge=0)],
    "token_weight": Annotated[FiniteFloat, Field(ge=0)],   # of the log-token loss, beside the BCE
    "validation_fraction": Annotated[FiniteFloat, Field(gt=0, lt=1)],
    "time_limit_s": Annotated[FiniteFloat, Field(gt=0)],   # seconds; None: no limit
    "epochs": PositiveInt, "steps": PositiveInt, "batch_size": PositiveInt,
    "patience": PositiveInt,                               # epochs without improvement
    "max_iter": PositiveInt, "chunk_queries": PositiveInt,
    "threads": PositiveInt,                                # None: torch's own setting
    "k": PositiveInt,                                      # neighbours
    "knn": NonNegativeInt, "members": NonNegativeInt,      # residual: 0 turns the part off
    "hidden": PositiveInt,                                 # each layer's width
    "query_hidden": PositiveInt, "joint_hidden": PositiveInt,
    "model_embedding_dim": PositiveInt, "budget_embedding_dim": PositiveInt,
    "head_hidden": NonNegativeInt, "rank": NonNegativeInt,  # 0: a linear head / no bilinear part
    "seed": NonNegativeInt,                                # numpy seeds are non-negative
    "folds": FOLDS, "base_folds": FOLDS,
    "monotone": Literal[MONOTONE_OPTIONS], "precision": Literal[PRECISIONS],
    "arms": Literal[ARM_SETS],
}


def make_predictor(name: str, **settings) -> BasePredictor:
    """A new, unfitted predictor from the registry; unknown settings are an error naming them."""
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise PredictorError(f"unknown predictor {name!r}; choose one of "
                             f"{', '.join(PREDICTORS)}") from None
    _check_settings(name, settings)
    try:
        return factory(**settings)
    except TypeError as err:
        raise PredictorError(f"predictor {name!r}: bad settings {sorted(settings)}: {err}") from None


def _check_settings(name: str, settings: dict) -> None:
    """Each setting against its constructor annotation with the range ``SETTING_RULES`` gives its
    name (pydantic, strict: no text read as a number, no flag as a count): ``--set alpha=-1`` or
    ``--set steps=2.5`` is an error naming the setting, not a numpy traceback in the middle of a
    fit, or a fit that runs and means nothing (a negative ridge penalty, ``k=0`` neighbours)."""
    parameters = inspect.signature(PREDICTORS[name]).parameters
    for key, value in settings.items():
        if key not in parameters:
            continue   # the constructor names it (make_predictor's "bad settings")
        try:   # a numpy scalar (a seed from a range, a k from a grid) as the number it holds
            _setting_adapter(name, key).validate_python(
                value.item() if isinstance(value, np.generic) else value)
        except ValidationError as err:
            # the deepest error (a list's element); of a union's, the last branch (a list)
            error = max(reversed(err.errors()), key=lambda e: len(e["loc"]))
            raise PredictorError(f"predictor {name!r}: setting {key}={value!r}: "
                                 f"{error['msg'][0].lower()}{error['msg'][1:]} (default "
                                 f"{parameters[key].default!r})") from None


@functools.cache
def _setting_adapter(name: str, key: str) -> TypeAdapter:
    """The validator of one setting of one predictor kind (built once: make_predictor runs per
    CV fold and split)."""
    hint = inspect.signature(PREDICTORS[name], eval_str=True).parameters[key].annotation
    rule = SETTING_RULES.get(key)
    return TypeAdapter(hint if rule is None else _with_rule(hint, rule),
                       config=ConfigDict(strict=True))


def _with_rule(hint, rule):
    """``hint`` with ``rule`` in place of each plain scalar of the rule's base type, inside unions,
    lists and tuples: ``int | None`` → ``PositiveInt | None``; ``list[int]`` → ``list[PositiveInt]``;
    ``list[dict]`` (a composite's ``members``, not the residual's count) is left as it is."""
    if hint is _rule_base(rule):
        return rule
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return functools.reduce(operator.or_, (_with_rule(arg, rule) for arg in args))
    if typing.get_origin(hint) in (list, tuple):
        return typing.get_origin(hint)[tuple(a if a is Ellipsis else _with_rule(a, rule)
                                             for a in args)]
    return hint


def _rule_base(rule) -> type:
    """The scalar a rule constrains: ``Annotated[float, ...]`` → float, ``Literal["a"]`` → str."""
    if typing.get_origin(rule) is typing.Annotated:
        return typing.get_args(rule)[0]
    if typing.get_origin(rule) is typing.Literal:
        return type(typing.get_args(rule)[0])
    return rule
