"""A per-arm cost correction fitted on a reconciliation, for the next batch run and the pacer.

Each arm (model, budget) gets a multiplicative factor on ĉ (dimensionless: USD realised per USD
predicted). Arms are keyed by (model, budget), not by position, so a correction survives a
reordered catalogue. Corrections are versioned files, ``<run>/reconcile/<version>/correction.json``;
:func:`latest_correction` finds the newest one for a model and catalogue. A model's label may
name another predictor later (a local folder retrained in place; a registered name deleted and
registered again starts at version 1), so a correction also records the predictor's fingerprint
(``document_sha256`` of its ``predictor.json``) and applies to that predictor only.
Using one is the caller's choice (opt-out lives with the caller).
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import logging
import math
import posixpath
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from r2ray import __version__, storage
from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.manifest import MANIFEST
from r2ray.reconcile.figures import Reconciliation

PRIOR_ROWS = 20.0
"""Prior weight, in rows: an arm with n matched rows moves n / (n + PRIOR_ROWS) of the way from
its model's factor to its own ratio (and a model from the overall ratio, the overall from 1);
from the factor the run was priced with, where that correction has one."""
FACTOR_RANGE = (0.25, 4.0)
"""Every factor is clipped to this range: one night's actuals never scale a cost more than 4×."""
FORMAT = 1
CORRECTION_FILE = "correction.json"
RECONCILE_FOLDER = "reconcile"
log = logging.getLogger(__name__)


def correction_folder(run_folder_uri: str, version: str) -> str:
    """Where ``r2ray reconcile`` writes a run's correction ``version`` (with its report and plot):
    ``<run>/reconcile/<version>/``."""
    return storage.join(run_folder_uri, RECONCILE_FOLDER, version)


class CorrectionError(R2RayError, ValueError):
    """A correction that cannot be fitted or read."""


class Factor(NamedTuple):
    model: str
    budget: int | None   # output tokens (0 = default); None: the model as a whole
    factor: float        # USD realised per USD predicted
    rows: int            # matched rows it rests on


@dataclass(frozen=True)
class CostCorrection:
    """Multiplicative factors on ĉ per arm, per model and overall, and where they come from."""

    version: str                  # UTC stamp + short hash of the content
    created_at: str               # ISO 8601, UTC
    source_run_id: str
    model_label: str              # NAME/VERSION, or a local model's folder
    catalog_fingerprint: str
    rows: int                     # matched rows the whole correction rests on
    overall: float
    models: tuple[Factor, ...]
    arms: tuple[Factor, ...]
    prior_rows: float = PRIOR_ROWS
    factor_range: tuple[float, float] = FACTOR_RANGE
    model_fingerprint: str | None = None  # the predictor's document_sha256; None: fitted
                                          # before r2ray recorded it

    def factors_for(self, catalog: Catalog) -> np.ndarray:
        """float64 [K], one per arm of ``catalog``: the arm's factor, else its model's (an arm
        nothing was routed to has only its model to go on), else 1.0 (a model never routed to)."""
        by_arm = {(f.model, f.budget): f.factor for f in self.arms}
        by_model = {f.model: f.factor for f in self.models}
        return np.array([by_arm.get((a.model, a.budget_tokens), by_model.get(a.model, 1.0))
                         for a in catalog.arms], dtype=np.float64)

    def to_json(self) -> str:
        document = {"format": FORMAT, "r2ray_version": __version__, **_content(self),
                    "version": self.version, "created_at": self.created_at}
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "correction") -> CostCorrection:
        try:
            document = json.loads(text)
            if document.get("format") != FORMAT:
                raise CorrectionError(f"{source}: format {document.get('format')!r} is not "
                                      f"{FORMAT}")
            correction = cls(
                version=document["version"], created_at=document["created_at"],
                source_run_id=document["source_run_id"], model_label=document["model_label"],
                catalog_fingerprint=document["catalog_fingerprint"], rows=int(document["rows"]),
                overall=float(document["overall"]),
                models=tuple(Factor(f["model"], None, float(f["factor"]), int(f["rows"]))
                             for f in document["models"]),
                arms=tuple(Factor(f["model"], int(f["budget"]), float(f["factor"]),
                                  int(f["rows"])) for f in document["arms"]),
                prior_rows=float(document["prior_rows"]),
                factor_range=tuple(map(float, document["factor_range"])),
                model_fingerprint=document.get("model_fingerprint"))   # absent: fitted before
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, CorrectionError):
                raise
            raise CorrectionError(f"{source}: not a cost correction ({type(err).__name__}: "
                                  f"{err})") from None
        problem = _problem(correction)
        if problem is not None:
            raise CorrectionError(f"{source}: {problem}")
        return correction


def _problem(correction: CostCorrection) -> str | None:
    """What makes a read correction unusable, naming the field, or None. A hand-edited or
    corrupted file must not price a night: factors are finite, positive and inside the file's
    own ``factor_range`` (fitting clips every one to it), the range is two finite positive
    bounds in order, ``prior_rows`` and every row count are finite and non-negative."""
    bounds = correction.factor_range
    if not (len(bounds) == 2 and all(math.isfinite(b) and b > 0 for b in bounds)
            and bounds[0] <= bounds[1]):
        return f"factor_range {list(bounds)} is not two finite positive bounds, low ≤ high"
    if not isinstance(correction.model_fingerprint, (str, type(None))):
        return f"model_fingerprint {correction.model_fingerprint!r} is not a sha256 string"
    if not (math.isfinite(correction.prior_rows) and correction.prior_rows >= 0):
        return f"prior_rows {correction.prior_rows:g} is not a finite non-negative row count"
    named = [("overall", correction.overall, correction.rows),
             *((f"models[{i}] ({f.model})", f.factor, f.rows)
               for i, f in enumerate(correction.models)),
             *((f"arms[{i}] ({f.model}, budget {f.budget})", f.factor, f.rows)
               for i, f in enumerate(correction.arms))]
    for name, factor, rows in named:
        if not (math.isfinite(factor) and factor > 0):
            return f"{name}: factor {factor:g}; factors must be finite and positive"
        if not bounds[0] <= factor <= bounds[1]:
            return f"{name}: factor {factor:g} is outside factor_range {list(bounds)}"
        if rows < 0:
            return f"{name}: rows {rows} is negative"
    return None


def _content(correction: CostCorrection) -> dict:
    """Everything but the version and the time: what the version's hash covers."""
    return {"source_run_id": correction.source_run_id, "model_label": correction.model_label,
            "model_fingerprint": correction.model_fingerprint,
            "catalog_fingerprint": correction.catalog_fingerprint, "rows": correction.rows,
            "prior_rows": correction.prior_rows, "factor_range": list(correction.factor_range),
            "overall": correction.overall,
            "models": [{"model": f.model, "factor": f.factor, "rows": f.rows}
                       for f in correction.models],
            "arms": [{"model": f.model, "budget": f.budget, "factor": f.factor, "rows": f.rows}
                     for f in correction.arms]}


def shrunk_ratio(realised_usd: float, planned_usd: float, rows: int, parent: float,
                 prior_rows: float = PRIOR_ROWS) -> float:
    """(n·r + m·parent) / (n + m), with r = Σ realised / Σ ĉ (USD / USD) over n rows and m =
    ``prior_rows``: the parent's factor counted as m rows of evidence. No rows (or no planned
    spend): the parent."""
    if rows <= 0 or planned_usd <= 0:
        return parent
    ratio = realised_usd / planned_usd
    return (rows * ratio + prior_rows * parent) / (rows + prior_rows)


def fit_correction(rec: Reconciliation, prior_rows: float = PRIOR_ROWS,
                   factor_range: tuple[float, float] = FACTOR_RANGE,
                   now: dt.datetime | None = None,
                   priced_with: CostCorrection | None = None) -> CostCorrection:
    """Factors from the matched rows of ``rec``: overall ratio shrunk toward 1, each model's
    toward the overall, each arm's toward its model (:func:`shrunk_ratio`), every one clipped to
    ``factor_range``. ``priced_with``: the correction the run's ĉ was multiplied by; where it
    has a factor for the overall, a model or an arm, that factor is the parent instead, so a
    model or arm of it that no matched row of ``rec`` speaks for keeps its factor and one that
    few rows speak for moves from it by their weight (a model its factor priced out of the night
    would otherwise fall back to 1.0, or after one matched row most of the way to it, and be
    routed to at a fraction of its bill the night after). Raises :class:`CorrectionError` when
    no routed row was matched."""
    total = rec.counts["matched"]
    if total == 0:
        raise CorrectionError(f"run {rec.run_id}: no routed row has an actual, so there is "
                              "nothing to fit a cost correction on")
    clip = lambda x: float(np.clip(x, *factor_range))  # noqa: E731
    before = _priced_factors(priced_with)
    # against ĉ before any correction the run applied: the factor found multiplies that ĉ
    overall = clip(shrunk_ratio(rec.overall["realised_usd"], rec.overall["planned_raw_usd"],
                                total, before.get(None, 1.0), prior_rows))
    models = {row["model"]: Factor(row["model"], None, clip(shrunk_ratio(
        row["realised_usd"], row["planned_raw_usd"], row["matched"],
        before.get(row["model"], overall), prior_rows)),
        row["matched"]) for row in rec.by_model.to_pylist() if row["matched"]}
    arms = tuple(Factor(row["model"], row["budget"], clip(shrunk_ratio(
        row["realised_usd"], row["planned_raw_usd"], row["matched"],
        before.get((row["model"], row["budget"]), models[row["model"]].factor), prior_rows)),
        row["matched"]) for row in rec.by_arm.to_pylist() if row["matched"])
    if priced_with is not None:
        kept = lambda f: f._replace(factor=clip(f.factor))  # noqa: E731 — in this range too
        models |= {f.model: kept(f) for f in priced_with.models if f.model not in models}
        fitted = {(f.model, f.budget) for f in arms}
        arms += tuple(kept(f) for f in priced_with.arms if (f.model, f.budget) not in fitted)
    when = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    draft = CostCorrection("", when.isoformat(timespec="microseconds"), rec.run_id,
                           rec.model_label, rec.catalog_fingerprint, total, overall,
                           tuple(models.values()), arms, prior_rows, tuple(factor_range),
                           rec.model_fingerprint)
    digest = hashlib.sha256(json.dumps(_content(draft), sort_keys=True).encode()).hexdigest()
    version = f"{when.strftime('%Y%m%dT%H%M%SZ')}-{digest[:8]}"
    return replace(draft, version=version)


def _priced_factors(priced_with: CostCorrection | None) -> dict:
    """The factors ĉ was priced with, keyed None (overall), model, or (model, budget); empty
    when none was: the parents :func:`fit_correction` shrinks toward where they exist."""
    if priced_with is None:
        return {}
    return ({None: priced_with.overall} | {f.model: f.factor for f in priced_with.models}
            | {(f.model, f.budget): f.factor for f in priced_with.arms})


def latest_correction(output_root: str, model_label: str, catalog_fingerprint: str,
                      model_fingerprint: str | None, version: str | None = None
                      ) -> CostCorrection | None:
    """The newest correction (by ``created_at``) written under a committed run of
    ``output_root`` (the folder that holds run folders) for this model label and catalogue;
    None if there is none. ``model_fingerprint``: the predictor's ``document_sha256``, which the
    correction must record too (:func:`fitted_on`). ``version``: only the correction of that
    version qualifies (the one a run recorded in ``spend.cost_correction``). Lists
    ``*/reconcile/*/correction.json`` and ``*/manifest.json`` only; an unreadable correction is
    skipped with a warning, another model's with a debug note."""
    fs, root = storage.filesystem(output_root)
    if not fs.exists(root):
        return None
    root = glob.escape(root.rstrip("/"))   # literal: ``out[1]`` is no wildcard matching ``out1``
    committed = {posixpath.dirname(p) for p in fs.glob(f"{root}/*/{MANIFEST}")}
    best: CostCorrection | None = None
    for path in fs.glob(f"{root}/*/{RECONCILE_FOLDER}/*/{CORRECTION_FILE}"):
        if path.rsplit(f"/{RECONCILE_FOLDER}/", 1)[0] not in committed:
            log.debug("skipping %s: its run folder has no committed manifest", path)
            continue
        try:
            found = CostCorrection.from_json(fs.cat_file(path).decode("utf-8"), path)
        except (CorrectionError, UnicodeDecodeError) as err:
            log.warning("skipping an unreadable cost correction: %s", err)
            continue
        if (found.model_label, found.catalog_fingerprint) != (model_label, catalog_fingerprint):
            log.debug("skipping %s: for model %s, catalogue %s…", path, found.model_label,
                      found.catalog_fingerprint[:12])
            continue
        if version is not None and found.version != version:
            continue
        if not fitted_on(found, model_fingerprint, path):
            continue
        if best is None or (found.created_at, found.version) > (best.created_at, best.version):
            best = found
    return best


def fitted_on(correction: CostCorrection, model_fingerprint: str | None, path: str) -> bool:
    """Whether ``correction`` (read from ``path``) was fitted on the predictor of
    ``model_fingerprint``. One of another predictor under the same label (retrained into the
    folder, registered again under the name) is skipped with an info note; one fitted before
    fingerprints were recorded cannot tell, so it is skipped with a warning: never applied to a
    predictor it may not be about."""
    if correction.model_fingerprint == model_fingerprint:
        return True
    if correction.model_fingerprint is None:
        log.warning("not applying cost correction %s to %s: it was fitted before r2ray recorded "
                    "which predictor a run used, and that label may now name another predictor "
                    "(a folder retrained in place, a registered name deleted and registered "
                    "again); reconcile a run routed with this one to fit a correction for it",
                    path, correction.model_label)
    else:
        log.info("skipping %s: fitted on another predictor under %s (fingerprint %s…, this one "
                 "%s…)", path, correction.model_label, correction.model_fingerprint[:12],
                 str(model_fingerprint)[:12])
    return False
