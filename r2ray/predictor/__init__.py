"""Predictors: query embedding → per-arm quality q̂ and output tokens t̂ (hence cost ĉ).

The registry of kinds and ``make_predictor`` live in :mod:`.kinds`; saving and loading in
:mod:`.persist`. The names below are imported from their modules on first use, so importing a
torch-free part of this package (``data``, ``persist``, ``spend_guarantee``, the calibrations)
does not import torch: the batch job's driver routes a saved predictor without it.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "ArmPredictions": "base", "BasePredictor": "base", "Predictor": "base",
    "PredictorError": "base", "AveragedPredictor": "averaged",
    "CarrotKNN": "carrot", "CarrotLinear": "carrot", "R2RayPredictor": "joint",
    "PerArmMLP": "per_arm", "PerArmRidge": "per_arm", "ResidualPredictor": "residual",
    "SelectedPredictor": "selected", "StackedPredictor": "stacked",
    "COMPOSITE": "kinds", "PREDICTORS": "kinds", "make_predictor": "kinds",
    "PredictorVersionWarning": "persist", "load_predictor": "persist",
    "read_predictor_config": "persist", "save_predictor": "persist",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """``from r2ray.predictor import X``: X from its module, imported now (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
