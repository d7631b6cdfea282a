"""Reconciliation: a committed batch run's plan against what its routed requests really cost.

:mod:`.actuals` reads realised usage (the execution engine's rows, bad ones counted with a reason),
:mod:`.figures` joins it with the run's routed rows and computes planned vs realised spend and
quality overall, per model and per arm, :mod:`.correction` fits and finds the per-arm cost
correction, :mod:`.report` writes report.md, the plot and correction.json and logs to MLflow,
:mod:`.run` is ``r2ray reconcile``. All but the last two are functions over Arrow tables and
numpy, without Ray.
"""

from r2ray.reconcile.actuals import ACTUALS_SCHEMA, ActualsError, actuals_from_table, read_actuals
from r2ray.reconcile.correction import (CostCorrection, CorrectionError, Factor, fit_correction,
                                        latest_correction, shrunk_ratio)
from r2ray.reconcile.figures import (CatalogMismatch, Reconciliation, model_label, priced_usd,
                                     read_routed, reconcile)
from r2ray.reconcile.report import write_reconciliation
from r2ray.reconcile.run import ReconcileResult, reconcile_run, run_catalog

__all__ = ["ACTUALS_SCHEMA", "ActualsError", "CatalogMismatch", "CorrectionError",
           "CostCorrection", "Factor", "ReconcileResult", "Reconciliation", "actuals_from_table",
           "fit_correction", "latest_correction", "model_label", "priced_usd", "read_actuals",
           "read_routed", "reconcile", "reconcile_run", "run_catalog", "shrunk_ratio",
           "write_reconciliation"]
