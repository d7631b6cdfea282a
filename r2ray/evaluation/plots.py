"""curves.png: deferral curves of every method on one split, and cost_calibration.png (plotting
only; metrics live elsewhere).

Left: quality vs USD per query (log scale) — each method's λ points and frontier; single models
as labelled dots. Right: quality vs normalised cost, drawn exactly as AUDC integrates it (0 left of
a curve, flat to the right).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from r2ray.evaluation.methods import ORACLE_ALL, ORACLE_DEFAULT, RANDOM, SINGLE_PREFIX
from r2ray.evaluation.metrics import DeferralCurve, normalise_cost
from r2ray.evaluation.method_scores import MethodResult


def curves_png(results: dict[str, MethodResult], summary: dict, title: str, subject: str) -> bytes:
    figure = Figure(figsize=(15, 6.5), layout="constrained")
    usd, normalised = figure.subplots(1, 2)
    bounds = (summary["normalisation"]["cost_min_usd"], summary["normalisation"]["cost_max_usd"])
    target = summary["reference"]["target_quality"]
    for i, (name, result) in enumerate(sorted(results.items())):
        style = _style(name, subject, i)
        if name.startswith(SINGLE_PREFIX):
            _single(usd, normalised, name, result.curve, bounds)
            continue
        if name == RANDOM:
            usd.plot(result.curve.cost_usd, result.curve.quality, label=name, **style)
            normalised.plot(normalise_cost(result.curve.cost_usd, *bounds), result.curve.quality,
                            label=name, **style)
            continue
        usd.plot(result.points_cost_usd, result.points_quality, ".", alpha=0.25, color=style["color"])
        usd.plot(result.curve.cost_usd, result.curve.quality, label=name, **style)
        normalised.plot(*_audc_outline(result.curve, bounds), label=name, **style)
    for axis in (usd, normalised):
        axis.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        axis.set_ylabel("mean realised quality")
        axis.grid(alpha=0.3)
    usd.set_xscale("log")
    usd.set_xlabel("mean realised cost per query (USD, log scale)")
    usd.set_title("λ sweep: points and frontiers (dotted line: 95% of best single model)")
    normalised.set_xlabel("normalised cost (what AUDC integrates)")
    normalised.set_xlim(0, 1)
    normalised.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _style(name: str, subject: str, index: int) -> dict:
    if name == subject:
        return {"color": "crimson", "linewidth": 2.5}
    if name in (ORACLE_ALL, ORACLE_DEFAULT):
        return {"color": "black", "linestyle": "--" if name == ORACLE_ALL else ":", "linewidth": 1.5}
    if name == RANDOM:
        return {"color": "grey", "marker": "x", "markersize": 9, "linestyle": "none"}
    return {"color": f"C{index % 10}", "linewidth": 1.3,
            "linestyle": "-" if name.endswith("_all") or name.startswith("per_arm") else "-."}


def _single(usd, normalised, name: str, curve: DeferralCurve, bounds: tuple[float, float]) -> None:
    label = name.removeprefix(SINGLE_PREFIX)
    x = normalise_cost(curve.cost_usd, *bounds)
    usd.plot(curve.cost_usd, curve.quality, "o", color="slategrey", markersize=5)
    usd.annotate(label, (curve.cost_usd[0], curve.quality[0]), fontsize=6,
                 xytext=(3, 3), textcoords="offset points")
    normalised.plot(x, curve.quality, "o", color="slategrey", markersize=4)


def _audc_outline(curve: DeferralCurve, bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    x = normalise_cost(curve.cost_usd, *bounds)
    xs = np.concatenate([[x[0]], x, [max(1.0, x[-1])]])
    qs = np.concatenate([[0.0], curve.quality, [curve.quality[-1]]])
    return xs, qs


def cost_calibration_png(calibration: dict, title: str) -> bytes:
    """cost_calibration.png: mean predicted vs realised USD per arm (left) and per decile of ĉ
    (right), log-log, against the diagonal (above it: ĉ too high; below: too low)."""
    figure = Figure(figsize=(12, 5.5), layout="constrained")
    for axis, blocks, what in zip(figure.subplots(1, 2),
                                  (list(calibration["per_arm"].values()), calibration["per_decile"]),
                                  ("arm", "decile of predicted cost")):
        blocks = [b for b in blocks if b["n"] and b["realised_usd"] > 0 and b["predicted_usd"] > 0]
        realised = np.array([b["realised_usd"] for b in blocks])
        predicted = np.array([b["predicted_usd"] for b in blocks])
        axis.plot(realised, predicted, "o-" if what != "arm" else "o", markersize=4)
        if len(blocks):
            low, high = min(realised.min(), predicted.min()), max(realised.max(), predicted.max())
            axis.plot([low, high], [low, high], color="crimson", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("mean realised cost (USD)")
        axis.set_ylabel("mean predicted cost ĉ (USD)")
        axis.set_title(f"per {what}")
        axis.grid(alpha=0.3)
    overall = calibration["overall"]["ratio"]
    figure.suptitle(f"{title} — Σ ĉ / Σ realised = "
                    f"{'n/a' if overall is None else f'{overall:.3f}'}", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def reliability_png(block: dict, title: str) -> bytes:
    """reliability.png: mean observed quality against mean q̂ per bin, with and without the
    predictor's own calibration (``block``: :func:`r2ray.evaluation.calibration.quality_calibration`)."""
    figure = Figure(figsize=(5.5, 5.5), layout="constrained")
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for suffix, label, color in (("_uncalibrated", "q̂ as fitted", "C0"),
                                 ("", "q̂ calibrated (used)", "crimson")):
        bins = block[f"bins{suffix}"]
        keep = [i for i, n in enumerate(bins["count"]) if n > 0]
        axis.plot([bins["mean_predicted"][i] for i in keep],
                  [bins["mean_observed"][i] for i in keep], marker="o", color=color,
                  label=f"{label}: ECE {block[f'ece{suffix}']:.3f}")
    axis.set(xlabel="predicted quality q̂ (bin mean)", ylabel="observed quality (bin mean)",
             xlim=(0, 1), ylim=(0, 1))
    axis.legend(fontsize=8, loc="upper left")
    axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def learning_curves_png(block: dict, references: dict[str, float], subject: str,
                        title: str) -> bytes:
    """learning_curves.png: AUDC (mean ± std over splits) against training queries per learned
    method; ``references`` ({name: AUDC} of non-learned methods on the full splits) as lines."""
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axis = figure.subplots()
    sizes = np.asarray(block["sizes"], dtype=float)
    for i, (name, curve) in enumerate(sorted(block["methods"].items())):
        mean = np.asarray([a if a is not None else np.nan for a in curve["audc"]], dtype=float)
        std = np.asarray([s if s is not None else 0.0 for s in curve["audc_std"]], dtype=float)
        style = _style(name, subject, i)
        axis.plot(sizes, mean, marker="o", label=name, **style)
        axis.fill_between(sizes, mean - std, mean + std, color=style["color"], alpha=0.12)
    for name, value in references.items():
        axis.axhline(value, color="black" if name.startswith("oracle") else "slategrey",
                     linestyle=":", linewidth=1)
        axis.annotate(name, (sizes[0] if len(sizes) else 1, value), fontsize=7,
                      xytext=(2, 2), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("training queries")
    axis.set_ylabel("AUDC on the split's test queries")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
