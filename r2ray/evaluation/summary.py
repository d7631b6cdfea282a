"""``metrics.json`` and the printed table, from the per-split outcomes (no metric logic here).

JSON has no infinity: a cost ratio of ``inf`` (only the baseline never reaches the quality) is
written as the string ``"inf"``; ``null`` means the method itself never reaches it.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np

import r2ray
from r2ray import storage
from r2ray.evaluation.adherence import LEVEL_FRACTIONS
from r2ray.evaluation.harness import MODEL_EVALUATION, SplitOutcome, aggregate_methods
from r2ray.evaluation.method_scores import REFERENCE_FRACTION

if TYPE_CHECKING:
    from r2ray.evaluation.run import ModelUnderTest

METRICS_FILE, CURVES_FILE = "metrics.json", "curves.png"
CALIBRATION_FILE = "cost_calibration.png"
RELIABILITY_FILE, LEARNING_CURVES_FILE = "reliability.png", "learning_curves.png"
OUTPUT_PLOTS = (CURVES_FILE, CALIBRATION_FILE, RELIABILITY_FILE, LEARNING_CURVES_FILE)

DEFINITIONS = {
    "choice": "per query argmax_j q̂_ij − λ ĉ_ij over the arms a method can use and the bench has "
              "(ties within 1e-9 go to the lower ĉ); one point per λ: mean realised quality and "
              "mean realised cost_usd per query from the bench's true outcomes",
    "curve": "upper-left Pareto frontier of the points, linearly interpolated",
    "audc": "area under quality vs normalised cost on [0, 1]; 0 left of the curve's cheapest "
            "point, flat at its peak right of its dearest point",
    "normalisation": "cost min–max over the non-learned methods' curves in the same split (the "
                     "'over' list: random, the oracles, each single model), so a learned method's "
                     "score does not depend on which other learned methods ran",
    "audc_log_cost": "supplementary, not the paper's AUDC: the same area with log10 cost min–max "
                     "normalised (null if a cost is 0); costs span decades, and on the linear "
                     "scale every router's curve saturates within the first few percent",
    "qnc": f"normalised cost where the curve first reaches {REFERENCE_FRACTION} × the best single "
           "model's quality; 1.0 if never",
    "peak": "highest quality on the curve",
    "cost_usd_at_95": "USD per query where the curve reaches the 95% target; null if never",
    "cost_ratio_at_95": "{baseline: cost_baseline / cost_method} at the 95% target: >1 means "
                        "the method is that many times cheaper; 'inf' baseline never reaches it; "
                        "null method never reaches it",
    "cost_ratio_at_95_vs_best_default": "the same against the cheapest default-arm baseline at "
                                        "the target (single models, random, carrot_*_default)",
    "cost_ratio_at_peak": "{baseline: cost_baseline / cost_method} at the baseline's own peak",
    "random": "uniform pick among the default arms per query; one point, its exact expectation",
    "oracle_default / oracle_all": "the λ sweep on the bench's true outcomes, default arms / all arms",
    "single:<model>": "that model's default arm for every query; one point",
    "cost_calibration": "per learned method, over test cells with a prediction and a bench "
                        "outcome: mean predicted cost ĉ vs mean realised cost_usd (USD) and their "
                        "ratio, overall (every split), per decile of ĉ (first split) and, for the "
                        "subject, per arm 'model@budget' (first split); ratio < 1: ĉ runs low",
    "budget_adherence": "per learned method and oracle_all: the test split routed by the exact "
                        "global-budget solve on the method's q̂ and ĉ (arms the bench lacks "
                        "excluded) at per-query budgets low × (high/low)^f, f in "
                        f"{list(LEVEL_FRACTIONS)}, low = mean cheapest realised arm, high = the "
                        "best single model's mean realised cost (f × high when low is 0: free "
                        "arms); per level the mean over splits of predicted and realised "
                        "spend ÷ budget and quality, feasible_splits = "
                        "splits where the budget covers the method's cheapest plan (else every "
                        "query on its cheapest predicted arm); worst = max over the levels "
                        "feasible in every split (of the means; _any_split: over feasible (split, "
                        "level)), null if none; guaranteed_*: the same solved under budget ÷ κ, "
                        "the batch job's default spend guarantee (0.95) sized by the method's own "
                        "cross-fitted spend simulation",
    "quality_calibration": "per learned method, over test cells with q̂ and an outcome: ece = "
                           "cell-weighted mean |mean q̂ − mean quality| over 10 equal-width bins "
                           "of q̂, with the predictor's own isotonic calibration (as routed) and "
                           "without it (_uncalibrated); audc / audc_uncalibrated: the method's "
                           "AUDC with each q̂ (same ĉ, same normalisation); means over splits; "
                           "reliability: the subject's bins in the first split",
    "learning_curves": "per learned method, AUDC (mean and sample std over splits) when fitted "
                       "on a seeded random subset of each split's training part of each size "
                       "(nested subsets), scored on the split's whole test part; sizes above a "
                       "split's training part are skipped with a note; n_splits per size: the "
                       "splits that scored it (replay may leave one out; null AUDC if none)",
    "_std": "sample std over splits (null with one split or a non-finite value); a mean is null "
            "if the value is null in any split",
    "n_splits": "splits the method was scored in: on a sampled bench (replay) a method none of "
                "whose picks a split's test queries were dealt is not scored there, and its means "
                "(and a cost ratio against it) run over the splits that scored it",
}


def metrics_document(outcomes: list[SplitOutcome], model: ModelUnderTest, split: str,
                     seeds: list[int], lambdas: np.ndarray, registered: dict,
                     context: dict) -> dict:
    """Everything ``metrics.json`` holds: aggregated methods, how they were normalised, inputs."""
    methods = aggregate_methods(outcomes)
    for name in methods:
        seconds = [o.fit_seconds[name] for o in outcomes if name in o.fit_seconds]
        if seconds:
            methods[name]["fit_seconds"] = float(np.mean(seconds))
    first = outcomes[0].summary
    return {
        "methods": methods,
        "subject": model.name,
        "normalisation": {
            "over": first["normalisation"]["over"],
            "per_split": [{"split": o.split.label, **_bounds(o.summary)} for o in outcomes],
        },
        "reference": {"fraction": REFERENCE_FRACTION,
                      "per_split": [{"split": o.split.label, **o.summary["reference"]}
                                    for o in outcomes]},
        "split": split,
        "seeds": seeds if split == "random" else [0],
        "splits": [{"label": o.split.label, "n_train": int(len(o.split.train)),
                    "n_test": o.n_test, "n_test_dropped_missing_default_arm": o.n_dropped}
                   for o in outcomes],
        **context,
        "model": {"uri": model.uri, "name": model.name, "settings": model.settings,
                  "encoder": model.encoder, "version": model.version,
                  "how_evaluated": MODEL_EVALUATION},
        "registered": registered,
        "lambdas_quality_per_usd": {"count": len(lambdas), "zero_included": bool(lambdas[0] == 0),
                                    "min_positive": float(lambdas[lambdas > 0].min()),
                                    "max": float(lambdas.max()), "spacing": "log"},
        "cost_calibration": cost_calibration_block(outcomes, model.name),
        "budget_adherence": budget_adherence_block(outcomes),
        "quality_calibration": quality_calibration_block(outcomes, model.name),
        "curves_png": f"points and frontiers of the first split ({outcomes[0].split.label})",
        "definitions": DEFINITIONS,
        "r2ray_version": r2ray.__version__,
    }


def cost_calibration_block(outcomes: list[SplitOutcome], subject: str) -> dict:
    """Overall calibration per split for every learned method; per decile (and, for the subject,
    per arm) from the first split."""
    first = outcomes[0].calibration
    return {"split": outcomes[0].split.label, "methods": {
        name: {"overall_per_split": [o.calibration[name]["overall"] for o in outcomes],
               "per_decile": c["per_decile"],
               **({"per_arm": c["per_arm"]} if name == subject else {})}
        for name, c in first.items()}}


def quality_calibration_block(outcomes: list[SplitOutcome], subject: str) -> dict:
    """Per learned method: ECE and AUDC with and without its quality calibration, means over
    splits (those that scored it: replay may leave a method out of one); the subject's reliability
    bins from the first split."""
    keys = ("ece", "ece_uncalibrated", "audc", "audc_uncalibrated")
    names = dict.fromkeys(name for o in outcomes for name in o.quality)
    block = {"split": outcomes[0].split.label, "methods": {
        name: {k: float(np.mean([o.quality[name][k] for o in outcomes if name in o.quality]))
               for k in keys}
        for name in names}}
    if subject in outcomes[0].quality:
        block["reliability"] = {k: outcomes[0].quality[subject][k]
                                for k in ("bins", "bins_uncalibrated", "ece", "ece_uncalibrated")}
    return block


def budget_adherence_block(outcomes: list[SplitOutcome]) -> dict:
    """Per method: each budget level's figures as the mean over splits, and the worst realised
    spend ÷ budget over the feasible levels (of those means, and in any one split; None if none)."""
    block = {}
    for name in outcomes[0].adherence:
        per_split = [o.adherence[name] for o in outcomes]
        levels = [{"fraction": f, **{k: float(np.mean([rows[i][k] for rows in per_split]))
                                     for k in per_split[0][i] if k != "feasible"},
                   "feasible_splits": sum(rows[i]["feasible"] for rows in per_split)}
                  for i, f in enumerate(LEVEL_FRACTIONS)]
        everywhere = [lv["realised_spend_ratio"] for lv in levels
                      if lv["feasible_splits"] == len(outcomes)]
        anywhere = [r["realised_spend_ratio"] for rows in per_split for r in rows if r["feasible"]]
        guaranteed = [r["guaranteed_realised_spend_ratio"] for rows in per_split for r in rows
                      if r["feasible"] and "guaranteed_realised_spend_ratio" in r]
        block[name] = {"levels": levels, "worst_realised_spend_ratio": _max(everywhere),
                       "worst_realised_spend_ratio_any_split": _max(anywhere),
                       "worst_guaranteed_spend_ratio_any_split": _max(guaranteed)}
    return block


def _max(values: list[float]) -> float | None:
    return max(values) if values else None


def _bounds(summary: dict) -> dict:
    return {k: summary["normalisation"][k] for k in ("cost_min_usd", "cost_max_usd")}


def to_json(metrics: dict) -> str:
    return json.dumps(_json_safe(metrics), indent=2, allow_nan=False)


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return "inf" if math.isinf(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_outputs(metrics: dict, outcomes: list[SplitOutcome], out_dir: str, subject: str) -> None:
    """Write the plots, then ``metrics.json`` last, so that a ``metrics.json`` in ``out_dir``
    always describes every file beside it: an earlier run's ``metrics.json`` goes first (a run
    stopped while plotting leaves none, not an old one beside new plots), and its plots that this
    run does not draw (``learning_curves.png`` of a run with ``--train-sizes``) go too."""
    plots = _plots(metrics, outcomes, subject)
    storage.remove(storage.join(out_dir, METRICS_FILE), recursive=False)
    for name in OUTPUT_PLOTS:
        if name in plots:
            storage.write_bytes(storage.join(out_dir, name), plots[name])
        else:
            storage.remove(storage.join(out_dir, name), recursive=False)
    storage.write_text(storage.join(out_dir, METRICS_FILE), to_json(metrics) + "\n")


def _plots(metrics: dict, outcomes: list[SplitOutcome], subject: str) -> dict[str, bytes]:
    """{file name: PNG bytes} of the plots this evaluation has data for."""
    from r2ray.evaluation.plots import (cost_calibration_png, curves_png, learning_curves_png,
                                        reliability_png)

    title = f"{metrics.get('bench', {}).get('uri', 'bench')} — {metrics['curves_png']}"
    plots = {CURVES_FILE: curves_png(outcomes[0].results, outcomes[0].summary, title, subject)}
    if subject in outcomes[0].calibration:
        plots[CALIBRATION_FILE] = cost_calibration_png(
            outcomes[0].calibration[subject], f"{subject}: predicted vs realised cost, "
            f"{outcomes[0].split.label}")
    reliability = metrics["quality_calibration"].get("reliability")
    if reliability is not None:
        plots[RELIABILITY_FILE] = reliability_png(
            reliability, f"{subject}: reliability of q̂ on {outcomes[0].split.label}'s test cells")
    curves = metrics.get("learning_curves")
    if curves and curves["sizes"]:
        singles = {n: m["audc"] for n, m in metrics["methods"].items()
                   if n.startswith("single:") or n == "oracle_all"}
        best = max((n for n in singles if n.startswith("single:")), key=singles.get, default=None)
        references = {n: singles[n] for n in ("oracle_all", best) if n in singles}
        plots[LEARNING_CURVES_FILE] = learning_curves_png(
            curves, references, subject, "AUDC against training queries (lines: full training "
            "part)")
    return plots


def format_table(metrics: dict) -> str:
    """Methods by AUDC: AUDC, QNC, Peak (mean ± std), USD per query at 95%, worst realised spend
    ÷ budget of the global-budget solve (``budget_adherence``), subject's cost ratio."""
    subject = metrics["subject"]
    methods = metrics["methods"]
    adherence = metrics.get("budget_adherence", {})
    ratios = methods[subject]["cost_ratio_at_95"]
    width = max(len(n) for n in methods) + 1
    header = (f"{'method':{width}} {'AUDC':>15} {'QNC':>15} {'Peak':>15} {'AUDC log-cost':>15} "
              f"{'USD/q @95%':>11} {'spend/B max':>11} {'guaranteed':>10} "
              f"{subject + ' × cheaper':>16}")
    lines = [header, "-" * len(header)]
    order = sorted(methods, key=lambda n: -(methods[n]["audc"] or 0.0))
    for name in order:
        m = methods[name]
        ratio = "—" if name == subject else _number(ratios.get(name), "{:.2f}×")
        worst = ("—" if name not in adherence else
                 _number(adherence[name]["worst_realised_spend_ratio"], "{:.3f}", "infeasible"))
        guaranteed = _guaranteed_cell(adherence.get(name))
        lines.append(f"{name:{width}} {_pm(m, 'audc')} {_pm(m, 'qnc')} {_pm(m, 'peak')} "
                     f"{_pm(m, 'audc_log_cost')} {_number(m['cost_usd_at_95'], '{:.3g}'):>11} "
                     f"{worst:>11} {guaranteed:>10} {ratio:>16}")
    splits = metrics["splits"]
    lines.append(f"AUDC, QNC, Peak, AUDC log-cost: {_spread_note(len(splits))}")
    lines.append(f"split: {metrics['split']} ({len(splits)} × ~{splits[0]['n_test']} test queries); "
                 f"95% target = {REFERENCE_FRACTION} × best single model's quality; "
                 f"{subject} vs best default-arm baseline at it: "
                 f"{_number(methods[subject]['cost_ratio_at_95_vs_best_default'], '{:.2f}×')}")
    if adherence:
        lines.append("spend/B max: worst realised spend ÷ budget of the exact global-budget "
                     f"solve over the {len(LEVEL_FRACTIONS)} budgets (cheapest arms up to the best "
                     "single model's spend) the method can meet in every split; guaranteed: the "
                     "same solved under the batch job's default spend guarantee (0.95), worst "
                     "over every level and split (metrics.json budget_adherence)")
    quality = metrics.get("quality_calibration", {}).get("methods", {})
    if quality:
        lines.append("q̂ calibration (ECE uncalibrated → calibrated; AUDC uncalibrated → "
                     "calibrated): " + "; ".join(
                         f"{name} {q['ece_uncalibrated']:.3f} → {q['ece']:.3f}, "
                         f"{q['audc_uncalibrated']:.3f} → {q['audc']:.3f}"
                         for name, q in quality.items()))
    curves = metrics.get("learning_curves")
    if curves and curves["sizes"]:
        lines.append(f"learning curves, AUDC at {', '.join(map(str, curves['sizes']))} training "
                     "queries: " + "; ".join(
                         f"{name} {' '.join('n/a' if a is None else f'{a:.3f}' for a in c['audc'])}"
                         for name, c in curves["methods"].items()))
    for note in (curves or {}).get("skipped", []):
        lines.append(f"learning curves: size {note['size']} skipped: {note['reason']}")
    return "\n".join(lines)


def _guaranteed_cell(adherence: dict | None) -> str:
    """The table's ``guaranteed`` cell: "—" for a method solved without a spend guarantee
    (``oracle_all``: the truth has no spend simulation to size one; a predictor that built
    none, as on a bench of a few queries), "infeasible" when no budget
    level was feasible, as ``spend/B max`` says it (it read "never", as if the guarantee failed)."""
    levels = (adherence or {}).get("levels", [])
    if not any("guaranteed_realised_spend_ratio" in level for level in levels):
        return "—"
    return _number(adherence["worst_guaranteed_spend_ratio_any_split"], "{:.3f}", "infeasible")


def _spread_note(n_splits: int) -> str:
    """What a table cell's number (and its ``±``) is: the ``_std`` of :func:`aggregate_metrics`."""
    if n_splits == 1:
        return "the one split's value (no spread)"
    return f"mean ± sample std (ddof 1) over the {n_splits} splits"


def _pm(m: dict, key: str) -> str:
    mean, std = m[key], m.get(f"{key}_std")
    if mean is None or math.isnan(mean):
        return f"{'—':>15}"
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return f"{text:>15}"


def _number(value: float | None, fmt: str, none: str = "never") -> str:
    if value is None:
        return none
    if math.isinf(value):
        return "inf"
    return fmt.format(value)
