"""What a batch run tells people: spend by model and budget (table + plot), and an MLflow run.

Numbers come from the assign stage's per-(model, budget) sums; this module only formats them.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import sys

import numpy as np
import pyarrow as pa

from r2ray import storage
from r2ray.catalog import budget_label
from r2ray.redaction import redact_values

BATCH_EXPERIMENT = "r2ray-batch"   # the MLflow experiment of the nightly job's runs
STATS_SCHEMA = pa.schema([
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),
    pa.field("queries", pa.int64()),
    pa.field("spend_usd", pa.float64()),     # predicted, USD
    pa.field("worst_case_usd", pa.float64()),  # at the max_tokens caps, USD
    pa.field("quality_sum", pa.float64()),   # Σ q̂
    pa.field("tokens_sum", pa.float64()),    # Σ t̂
])


def combine_stats(parts: pa.Table) -> pa.Table:
    """Sum per-block stats into one row per (model, budget), sorted by spend (largest first)."""
    if parts.num_rows == 0:
        return parts.cast(STATS_SCHEMA)
    summed = STATS_SCHEMA.names[2:]  # every column but the (model, budget) key
    grouped = parts.group_by(["model", "budget"]).aggregate([(name, "sum") for name in summed])
    grouped = pa.table({name: grouped.column(name if name in ("model", "budget") else f"{name}_sum")
                        for name in STATS_SCHEMA.names})
    return grouped.select(STATS_SCHEMA.names).cast(STATS_SCHEMA).sort_by(
        [("spend_usd", "descending"), ("model", "ascending"), ("budget", "ascending")])


def spend_by_model(stats: pa.Table) -> dict[str, dict]:
    """{model: {queries, spend_usd, worst_case_usd}} for the manifest."""
    out: dict[str, dict] = {}
    for row in stats.to_pylist():
        entry = out.setdefault(row["model"],
                               {"queries": 0, "spend_usd": 0.0, "worst_case_usd": 0.0})
        for name in entry:
            entry[name] += row[name]
    return out


def usd_digits(value: float) -> str:
    """A sum of money (USD) for people, without the ``$``: six significant digits, the cents
    kept however large it is (``.6g`` read a $12,345.67 budget as 12345.7 and $1,234,567.89 as
    1.23457e+06), and a tiny per-query sum readable (3e-05). From $1e15 on, where a float64
    holds no cents, six significant digits ($1e+300)."""
    whole_digits = len(f"{abs(value):.0f}") if abs(value) < 1e15 else 0   # NaN: 0
    return f"{value:.{max(6, whole_digits + 2)}g}"


def known_counts(counts: dict) -> dict[str, int]:
    """The manifest's counts MLflow can log: every one but a count the run could not know
    (``rows_planned`` is None where a jsonl file is in the input; MLflow refuses a None metric,
    and the whole run's metrics with it)."""
    return {name: value for name, value in counts.items() if value is not None}


def guarantee_lines(guarantee: dict | None) -> list[str]:
    """The spend guarantee in words: what is promised, how it was sized, what it cost."""
    if not guarantee or guarantee["probability"] == 0:
        return ["- spend guarantee: none (`--spend-guarantee 0`): planned on predicted costs"] \
            if guarantee else []
    if guarantee["probability"] == 1:
        return [f"- spend guarantee: {guarantee['method']}"]
    lines = [f"- **spend guarantee**: realised spend ≤ ${usd_digits(guarantee['budget_usd'])} with "
             f"probability ≥ {percent_bound(guarantee['probability'], upper=False)}, "
             f"planning under ${usd_digits(guarantee['planned_limit_usd'])} (budget ÷ {guarantee['inflation']:.4f}); "
             f"expected realised ≈ ${usd_digits(guarantee['expected_realised_usd'])}",
             f"  - method: {guarantee['method']}"]
    if "quality_given_up_at_most" in guarantee:
        share = guarantee.get("quality_given_up_share_at_most")
        lines.append(f"  - quality given up for it: at most "
                     f"{guarantee['quality_given_up_at_most']:.6g} Σ q̂ ("
                     + ("" if share is None else
                        f"{percent_bound(share, upper=True)} of the objective; ")
                     + "dual bound)")
    return lines


def percent_bound(share: float, upper: bool) -> str:
    """A bound given as a share (0.995) in percent with up to two decimals, rounded so that it
    stays true: a lower bound (a guarantee's probability) down, an upper bound (the quality
    given up) up. Rounded to the nearest, p ≥ 0.995 read "≥ 100%", the strict budget's
    certainty, and a share of 0.004% given up read "≤ 0.00%"."""
    hundredths = round(share * 1e4, 6)   # 0.29 × 1e4 is 2899.9999999999995
    hundredths = math.ceil(hundredths) if upper else math.floor(hundredths)
    return f"{hundredths / 100:.2f}".rstrip("0").rstrip(".") + "%"


def correction_lines(record: dict | None) -> list[str]:
    """One line when a reconciliation's per-arm cost factors priced ĉ (report and terminal),
    saying so when they did not price the solve (``--strict-budget``: worst-case costs)."""
    if not record or not record.get("applied"):
        return []
    line = (f"ĉ × per-arm cost correction {record['version']} (from reconciling run "
            f"{record['source_run_id']}: {record['rows']:,} rows, overall × "
            f"{record['overall']:.4f})")
    if record.get("priced_solve") is False:   # absent in runs committed before it was recorded
        line += (": the predicted spend and c_hat_usd only; the strict budget's solve spent "
                 "each arm's worst case at its cap, which the correction does not change")
    return [line]


def guarantee_metrics(guarantee: dict | None) -> dict[str, float]:
    if not guarantee:
        return {}
    keys = ("inflation", "planned_limit_usd", "expected_realised_usd", "quality_given_up_at_most")
    return {f"guarantee_{k}": float(guarantee[k]) for k in keys
            if guarantee.get(k) is not None}


def report_markdown(manifest: dict, stats: pa.Table) -> str:
    manifest = redact_values(manifest)  # URIs may carry credentials; the report never does
    counts, spend = manifest["counts"], manifest["spend"]
    lines = [
        f"# r2ray batch run `{manifest['run_id']}`", "",
        f"- committed: {manifest['committed_at']}",
        f"- model: `{manifest['model']['uri']}` (version {manifest['model']['version']})",
        f"- queries in: {counts['rows_in']:,} · routed: {counts['routed']:,} · "
        f"deferred: {counts['deferred']:,} · quarantined: {counts['quarantined']:,} · "
        f"unreadable files: {counts['unreadable_files']}"
        + (f" · rows in them not read: {counts['unread_rows']:,}" if counts.get("unread_rows")
           else ""),
        f"- budget: ${usd_digits(spend['budget_usd'])} (planned under ${usd_digits(spend['usable_usd'])}) · "
        f"predicted spend: ${usd_digits(spend['predicted_usd'])} · worst case at the caps: "
        f"${usd_digits(spend.get('worst_case_usd', float('nan')))}",
        *guarantee_lines(spend.get("guarantee")),
        *("- " + line for line in correction_lines(spend.get("cost_correction"))),
        "- **strict budget**: every arm was priced at its worst case (`max_tokens` × output "
        "price), so the bill cannot exceed the usable budget; the objective Σ q̂ below is the "
        "quality kept under that guarantee" if spend.get("strict_budget") else
        "- budget binds the predicted spend (not `--strict-budget`): the bill can exceed it, "
        "up to the worst case",
        "- **no query could be routed: every row was quarantined**" if manifest["solve"] is None
        else f"- λ* = {manifest['solve']['lambda']:.6g} quality/USD · "
             f"θ* = {manifest['solve']['theta']:.4f} · objective Σ q̂ = "
             f"{manifest['solve']['objective']:.6g} · proven gap ≤ "
             f"{manifest['solve']['gap']:.6g} (quality, summed)", "",
        "| model | budget | queries | spend USD | worst case USD | mean q̂ | mean t̂ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in stats.to_pylist():
        n = max(row["queries"], 1)
        lines.append(f"| {table_cell(row['model'])} | {budget_label(row['budget'])} | "
                     f"{row['queries']:,} | {usd_digits(row['spend_usd'])} | {usd_digits(row['worst_case_usd'])} | "
                     f"{row['quality_sum'] / n:.3f} | {row['tokens_sum'] / n:.0f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in manifest["timings"].items())]
    return "\n".join(lines) + "\n"


MARKDOWN_SPECIAL = "\\`*_[]<>|~&$"   # inline Markdown (GFM, math) a table cell would act on


def table_cell(text: str) -> str:
    """``text`` as one Markdown table cell that reads as written: model names are data, and a
    ``|`` would end the cell (the row's numbers shifting into the wrong columns), ``*``/``_``
    emphasise, backticks make code, ``<`` start HTML, ``[`` a link, ``&`` an entity, ``~``
    strike and ``$`` math. Each is escaped with a backslash, as CommonMark allows for any ASCII
    punctuation."""
    return "".join("\\" + char if char in MARKDOWN_SPECIAL else char for char in text)


def spend_plot_png(stats: pa.Table) -> bytes:
    """A stacked bar chart: predicted spend per model, stacked by budget. Model names are drawn
    as plain text: as mathtext a name with two ``$`` (``a$$b``) failed the whole run's report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stats.to_pylist()
    with plt.rc_context({"text.parse_math": False}):   # rcParams are read as it draws
        models = sorted({r["model"] for r in rows}, key=lambda m: -sum(
            r["spend_usd"] for r in rows if r["model"] == m))
        budgets = sorted({r["budget"] for r in rows}, key=lambda b: (b == 0, b))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        bottom = np.zeros(len(models))
        colours = plt.cm.viridis(np.linspace(0, 1, max(len(budgets), 1)))
        for colour, budget in zip(colours, budgets):
            spend = np.array([sum(r["spend_usd"] for r in rows
                                  if r["model"] == m and r["budget"] == budget) for m in models])
            ax.bar(models, spend, bottom=bottom, color=colour, label=budget_label(budget))
            bottom += spend
        ax.set_ylabel("predicted spend (USD)")
        ax.set_title("Spend by model and length budget")
        if rows:
            ax.legend(title="budget (tokens)", fontsize=7, ncol=2)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
        try:
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            return buffer.getvalue()
        finally:
            plt.close(fig)


def spend_plot_or_none(stats: pa.Table) -> bytes | None:
    """:func:`spend_plot_png`, or None with a warning where it cannot be drawn: the plot is a
    picture of figures report.md and the manifest already hold, so a drawing failure never
    keeps a finished, paid-for solve from committing."""
    try:
        return spend_plot_png(stats)
    except Exception as err:  # noqa: BLE001 — anything matplotlib raises costs the picture only
        print(f"warning: the spend plot could not be drawn ({type(err).__name__}: {err}); the "
              "run commits without spend.png", file=sys.stderr)
        return None


def prepare_report(tracking_uri: str | None = None, experiment: str = BATCH_EXPERIMENT) -> None:
    """Do what the report stage would do first, ahead of it: import matplotlib (with Agg), PIL
    and MLflow (~4 s on a 2-core host), and open the MLflow store when it is a SQLite file that
    exists already (its schema check: ~1.2 s). The job runs this in a thread while its workers
    score. Nothing is created: a store that does not exist yet, or a tracking server (which may
    be down: the report stage warns about that), is left to the report stage."""
    import matplotlib

    matplotlib.use("Agg")
    for module in ("matplotlib.pyplot", "PIL.Image", "mlflow"):
        importlib.import_module(module)
    from r2ray.registry import configure_tracking

    uri = configure_tracking(tracking_uri)
    if uri.startswith("sqlite:///") and os.path.exists(uri[len("sqlite:///"):]):
        import mlflow

        mlflow.MlflowClient(uri).get_experiment_by_name(experiment)


def write_report(root_uri: str, manifest: dict, stats: pa.Table,
                 plot_png: bytes | None) -> dict[str, str]:
    """report.md and spend.png (``plot_png``: :func:`spend_plot_or_none` of ``stats``, drawn
    once for this and the MLflow run; None: no plot) under the run folder; returns their URIs."""
    report_uri = storage.join(root_uri, "report.md")
    storage.write_text(report_uri, report_markdown(manifest, stats))
    if plot_png is None:
        return {"report": report_uri}
    plot_uri = storage.join(root_uri, "spend.png")
    storage.write_bytes(plot_uri, plot_png)
    return {"report": report_uri, "spend_plot": plot_uri}


def log_to_mlflow(manifest: dict, stats: pa.Table, tracking_uri: str | None = None,
                  experiment: str = BATCH_EXPERIMENT, plot_png: bytes | None = None) -> str:
    """One MLflow run per batch: params, metrics, the report and the plot, with every URI in them
    redacted, as is MLflow's own output; ``plot_png``: the drawn spend plot (else drawn here).
    Returns its run id; MLflow's errors are RegistryError."""
    from r2ray.registry import configure_tracking, mlflow_guard

    with mlflow_guard():
        configure_tracking(tracking_uri)
        return _log_run(redact_values(manifest), stats, experiment,
                        plot_png if plot_png is not None else spend_plot_or_none(stats))


def _log_run(manifest: dict, stats: pa.Table, experiment: str, plot_png: bytes) -> str:
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=manifest["run_id"]) as run:
        mlflow.log_params({
            "run_id": manifest["run_id"], "model_uri": manifest["model"]["uri"],
            "model_version": manifest["model"]["version"], "input": manifest["input"]["uri"],
            "budget_usd": manifest["spend"]["budget_usd"],
            "spend_guarantee": manifest["config"].get("spend_guarantee", 0.0),
            "strict_budget": manifest["config"].get("strict_budget", False),
            "catalog_fingerprint": manifest["catalog_fingerprint"][:16],
        })
        mlflow.log_metrics({
            **known_counts(manifest["counts"]),   # every count report.md shows
            "predicted_spend_usd": manifest["spend"]["predicted_usd"],
            **({"worst_case_spend_usd": manifest["spend"]["worst_case_usd"]}
               if "worst_case_usd" in manifest["spend"] else {}),
            **guarantee_metrics(manifest["spend"].get("guarantee")),
            **({} if manifest["solve"] is None else {
                "lambda_star": manifest["solve"]["lambda"], "theta_star": manifest["solve"]["theta"],
                "gap": manifest["solve"]["gap"], "objective": manifest["solve"]["objective"]}),
            **{f"seconds_{k}": v for k, v in manifest["timings"].items()},
        })
        mlflow.log_text(report_markdown(manifest, stats), "report.md")
        if plot_png is not None:
            mlflow.log_image(_png_image(plot_png), "spend.png")
        mlflow.log_dict(manifest, "manifest.json")
        return run.info.run_id


def _png_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))
