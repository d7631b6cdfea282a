"""What a reconciliation tells people and the next runs: report.md, a plot, correction.json, and
metrics on the run's MLflow run. Everything goes under ``<run folder>/reconcile/<version>/``; the
committed manifest and the routed output are never touched."""

from __future__ import annotations

import io
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa

from r2ray import storage
from r2ray.batch.report import usd_digits
from r2ray.catalog import budget_label
from r2ray.reconcile.correction import (CORRECTION_FILE, RECONCILE_FOLDER, CostCorrection,
                                        correction_folder)
from r2ray.reconcile.figures import Reconciliation
from r2ray.redaction import MASK, redact_text

REPORT_FILE = "report.md"
PLOT_FILE = "realised_vs_planned.png"


def usd_text(value: float) -> str:
    """Money for people: ``$`` and :func:`r2ray.batch.report.usd_digits` (the cents kept: ``.6g``
    read a $12,345.67 budget as $12345.7), "—" where there is none (NaN)."""
    return "—" if not np.isfinite(value) else f"${usd_digits(value)}"


def _ratio(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.3f}"


def report_markdown(rec: Reconciliation, correction: CostCorrection) -> str:
    counts, overall = rec.counts, rec.overall
    lines = [
        f"# Reconciliation of run `{rec.run_id}`", "",
        f"- model: `{rec.model_label}` · catalogue {rec.catalog_fingerprint[:12]}…",
        f"- actuals: {', '.join(f'`{s}`' for s in rec.actuals_sources) or 'none'} — "
        f"{counts['actuals_rows']:,} rows, {counts['actuals_usable']:,} usable, "
        f"{sum(rec.invalid.values()):,} invalid{run_check_note(rec)}",
        f"- routed rows: {counts['routed']:,} · matched by an actual: {counts['matched']:,} · "
        f"routed without an actual: {counts['routed_without_actuals']:,} · usable actuals of no "
        f"routed row: {counts['actuals_not_routed']:,} · matched rows priced from the catalogue "
        f"(no `cost_usd`): {counts['priced_from_catalogue']:,}", "",
        "## Spend", "",
        "| | USD | ÷ budget |", "|---|---:|---:|",
        *(f"| {label} | {usd_text(overall[key])} | {_ratio(overall[key] / rec.budget_usd)} |"
          for label, key in _SPEND_ROWS),
        "", "Realised ÷ planned on the matched rows: "
        f"**{_ratio(overall['realised_over_planned'])}**. Projected: every routed row at that "
        "ratio.", "",
        f"Quality, on the {int(overall['rated']):,} matched rows with one: mean q̂ "
        f"{_ratio(overall['mean_q_hat_rated'])}, realised {_ratio(overall['mean_quality'])} "
        f"(mean q̂ over all matched rows {_ratio(overall['mean_q_hat'])}).", "",
        "## Invalid actuals", "", *_invalid_lines(rec), "",
        "## By model", "", *_group_lines(rec.by_model, with_budget=False), "",
        "## By arm", "", *_group_lines(rec.by_arm, with_budget=True), "",
        f"![realised vs planned spend per arm]({PLOT_FILE})", "",
        *_correction_lines(correction),
    ]
    return redact_text("\n".join(lines)) + "\n"


def run_check_note(rec: Reconciliation) -> str:
    """Whether the actuals could be checked as the run's: rows with no ``run_id`` (a provider's
    billing export) may be another night's bills with the same keys."""
    unchecked = rec.counts["actuals_run_unchecked"]
    if not unchecked:
        return ""
    return (f"; {unchecked:,} name no run_id: whether they are run {rec.run_id}'s bills "
            "could not be checked")


_SPEND_ROWS = [("budget", "budget_usd"), ("planned Σ ĉ, all routed rows", "planned_all_usd"),
               ("planned Σ ĉ, matched rows", "planned_usd"),
               ("**realised, matched rows**", "realised_usd"),
               ("projected realised, all routed rows", "projected_usd"),
               ("worst case at the `max_tokens` caps, matched rows", "worst_case_usd"),
               ("billed to usable actuals of no routed row (not in realised)", "not_routed_usd"),
               ("billed again to a repeated (query_id, model, budget) (not in realised)",
                "duplicate_usd")]


def _invalid_lines(rec: Reconciliation) -> list[str]:
    if not rec.invalid:
        return ["None."]
    return ["| reason | rows | first |", "|---|---:|---|",
            *(f"| {reason} | {n:,} | {rec.invalid_first[reason]} |"
              for reason, n in sorted(rec.invalid.items(), key=lambda kv: -kv[1]))]


def _group_lines(table: pa.Table, with_budget: bool) -> list[str]:
    head = "| model |" + (" budget |" if with_budget else "")
    lines = [head + " routed | matched | planned USD (matched) | realised USD | realised ÷ "
             "planned | mean q̂ | mean quality (rated) |",
             "|---|" + ("---:|" if with_budget else "") + "---:|---:|---:|---:|---:|---:|---:|"]
    for row in table.to_pylist():
        budget = f" {budget_label(row['budget'])} |" if with_budget else ""
        lines.append(f"| {row['model']} |{budget} {row['routed']:,} | {row['matched']:,} | "
                     f"{usd_digits(row['planned_usd'])} | {usd_digits(row['realised_usd'])} | "
                     f"{_ratio(row['realised_over_planned'])} | {_ratio(row['mean_q_hat'])} | "
                     f"{_ratio(row['mean_quality'])} ({row['rated']:,}) |")
    return lines


def _correction_lines(correction: CostCorrection) -> list[str]:
    low, high = correction.factor_range
    models = ", ".join(f"{f.model} {f.factor:.3f} ({f.rows:,} rows)" for f in correction.models)
    return [
        f"## Cost correction `{correction.version}`", "",
        f"Multiplicative factors on ĉ per arm (`{CORRECTION_FILE}`), resting on "
        f"{correction.rows:,} matched rows. Each is (n·r + m·parent) / (n + m): r = Σ realised ÷ "
        f"Σ ĉ over the arm's n matched rows, m = {correction.prior_rows:g} rows of prior weight; "
        "an arm's parent is its model's factor, a model's the overall one, the overall one's 1; "
        "where the correction the run was priced with has a factor for it, that factor is the "
        f"parent. Clipped to [{low:g}, {high:g}]. A model or arm with no matched row keeps the "
        "factor the run was priced with; without one, an arm takes its model's factor, a model "
        "1.", "",
        f"- overall: {correction.overall:.3f}", f"- by model: {models}", "",
        _pickup_sentence(correction),
    ]


def _pickup_sentence(correction: CostCorrection) -> str:
    """Which later runs price with the correction: those of the predictor it was fitted on
    (another one retrained into the folder, or registered again under the name, is not priced
    by it). One of a run committed before r2ray recorded its predictor is applied to none:
    :func:`r2ray.reconcile.correction.fitted_on` skips it with a warning."""
    if correction.model_fingerprint is None:
        return (f"**Not applied to later runs.** Run `{correction.source_run_id}` was committed "
                "before r2ray recorded which predictor a run used, and the label "
                f"`{correction.model_label}` may now name another predictor, so neither the "
                "batch job nor the Serve pacer takes this correction "
                "(`r2ray.reconcile.latest_correction` skips it with a warning). Reconcile a run "
                "routed with the current predictor to fit one they apply.")
    return (f"The next batch run and the Serve pacer for model `{correction.model_label}` "
            f"(predictor `{correction.model_fingerprint[:12]}…`, not another saved under it) on "
            "this catalogue pick up the newest correction (`r2ray.reconcile.latest_correction`) "
            "unless told not to.")


def spend_plot_png(rec: Reconciliation) -> bytes:
    """Realised against planned spend per arm (matched rows, USD), log-log, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rec.by_arm.to_pylist() if r["planned_usd"] > 0 and r["realised_usd"] > 0]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    models = sorted({r["model"] for r in rows})
    for i, model in enumerate(models):
        colour = plt.cm.tab10(i % 10)
        mine = [r for r in rows if r["model"] == model]
        ax.scatter([r["planned_usd"] for r in mine], [r["realised_usd"] for r in mine],
                   s=[12 + 4 * np.sqrt(r["matched"]) for r in mine], color=colour, label=model,
                   alpha=0.8)
    if rows:
        values = [v for r in rows for v in (r["planned_usd"], r["realised_usd"])]
        span = [min(values) / 1.5, max(values) * 1.5]
        ax.plot(span, span, color="grey", linewidth=1, linestyle="--", label="realised = planned")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("planned Σ ĉ per arm (USD, matched rows)")
    ax.set_ylabel("realised Σ cost per arm (USD)")
    ax.set_title(f"Run {rec.run_id}: realised vs planned spend per arm", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_reconciliation(run_folder_uri: str, rec: Reconciliation, correction: CostCorrection,
                         tracking_uri: str | None = None) -> dict:
    """report.md, the plot and correction.json under ``<run>/reconcile/<version>/``, then the
    metrics and those files on the run's MLflow run (a tracking failure only warns). Returns
    their URIs and the MLflow run id (None when nothing was logged)."""
    folder = correction_folder(run_folder_uri, correction.version)
    files = {REPORT_FILE: report_markdown(rec, correction).encode(),
             PLOT_FILE: spend_plot_png(rec), CORRECTION_FILE: correction.to_json().encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)
    logged = _log_safely(rec, correction, files, tracking_uri)
    return {"folder": folder, "report": storage.join(folder, REPORT_FILE),
            "plot": storage.join(folder, PLOT_FILE),
            "correction": storage.join(folder, CORRECTION_FILE), "mlflow_run_id": logged}


def _log_safely(rec: Reconciliation, correction: CostCorrection, files: dict[str, bytes],
                tracking_uri: str | None) -> str | None:
    if rec.mlflow_run_id is None:
        print(f"warning: run {rec.run_id} has no MLflow run; the reconciliation is in its folder "
              "only", file=sys.stderr)
        return None
    stored = rec.tracking_uri if rec.tracking_uri and MASK not in rec.tracking_uri else None
    try:   # the files are written: tracking being down must not lose them
        return log_to_mlflow(rec, correction, files, tracking_uri or stored)
    except Exception as err:  # noqa: BLE001 — any tracking failure only warns
        print(f"warning: could not log the reconciliation to MLflow ({type(err).__name__}: "
              f"{redact_text(str(err))})", file=sys.stderr)
        return None


def log_to_mlflow(rec: Reconciliation, correction: CostCorrection, files: dict[str, bytes],
                  tracking_uri: str | None = None) -> str:
    """The figures as metrics and the files as artifacts (``reconcile/<version>/``) on the run's
    own MLflow run; returns its id. MLflow's errors are RegistryError."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from r2ray.registry import configure_tracking, mlflow_guard

    with mlflow_guard(), tempfile.TemporaryDirectory(prefix="r2ray-reconcile-") as local:
        configure_tracking(tracking_uri)
        client = MlflowClient()
        stamp = int(time.time() * 1000)
        client.log_batch(rec.mlflow_run_id,
                         metrics=[Metric(k, float(v), stamp, 0) for k, v in rec.metrics().items()],
                         tags=[RunTag("reconcile_version", correction.version)])
        for name, data in files.items():
            with open(os.path.join(local, name), "wb") as handle:
                handle.write(data)
        client.log_artifacts(rec.mlflow_run_id, local, f"{RECONCILE_FOLDER}/{correction.version}")
    return rec.mlflow_run_id

