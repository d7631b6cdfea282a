"""``r2ray reconcile`` as one function: a committed run + its actuals → report, plot, correction."""

from __future__ import annotations

from dataclasses import dataclass

from r2ray import storage
from r2ray.catalog import Catalog, budget_label, load_catalog
from r2ray.errors import R2RayError
from r2ray.manifest import MANIFEST, read_manifest
from r2ray.reconcile.actuals import read_actuals
from r2ray.reconcile.correction import (CORRECTION_FILE, CostCorrection, correction_folder,
                                        fit_correction)
from r2ray.reconcile.figures import Reconciliation, check_catalog, read_routed, reconcile
from r2ray.reconcile.report import run_check_note, usd_text, write_reconciliation
from r2ray.redaction import MASK, redact_uri

TOP_ARMS = 5


@dataclass(frozen=True)
class ReconcileResult:
    reconciliation: Reconciliation
    correction: CostCorrection
    written: dict   # URIs of report, plot, correction and their folder; MLflow run id or None

    def summary(self) -> str:
        """A few lines for the terminal."""
        rec, counts, overall = self.reconciliation, self.reconciliation.counts, \
            self.reconciliation.overall
        invalid = ", ".join(f"{reason}: {n:,}" for reason, n in rec.invalid.items())
        lines = [
            f"reconciled run {rec.run_id} against {counts['actuals_rows']:,} actuals rows "
            f"({counts['actuals_usable']:,} usable"
            + (f"; invalid: {invalid})" if invalid else ")") + run_check_note(rec),
            f"  routed {counts['routed']:,}: {counts['matched']:,} matched, "
            f"{counts['routed_without_actuals']:,} without an actual; "
            f"{counts['actuals_not_routed']:,} usable actuals of no routed row "
            f"({usd_text(overall['not_routed_usd'])} billed, not in realised); "
            f"{usd_text(overall['duplicate_usd'])} billed again to a repeated key, not in realised",
            f"  spend: realised {usd_text(overall['realised_usd'])} vs planned "
            f"{usd_text(overall['planned_usd'])} on the matched rows "
            f"(×{overall['realised_over_planned']:.3f}); budget {usd_text(rec.budget_usd)}: "
            f"realised {overall['realised_over_budget']:.3f} × budget, "
            f"projected to every routed row {overall['projected_over_budget']:.3f} ×",
            f"  quality: mean q̂ {overall['mean_q_hat_rated']:.3f} vs realised "
            f"{overall['mean_quality']:.3f} on {int(overall['rated']):,} rated rows"
            if overall["rated"] else "  quality: no actual carries one",
            "  largest deviations (USD): " + "; ".join(self._top_arms()),
            f"  correction {self.correction.version}: overall ×{self.correction.overall:.3f}, "
            f"{len(self.correction.arms)} arms"
            + ("" if self.correction.model_fingerprint else "; not applied to later runs (the "
               "run was committed before r2ray recorded its predictor; see report.md)"),
            f"  written to {redact_uri(self.written['folder'])} (report.md, "
            "realised_vs_planned.png, correction.json); MLflow run "
            f"{self.written['mlflow_run_id'] or '(none: not logged)'}",
        ]
        return "\n".join(lines)

    def _top_arms(self) -> list[str]:
        rows = [r for r in self.reconciliation.by_arm.to_pylist() if r["matched"]]
        rows.sort(key=lambda r: -abs(r["realised_usd"] - r["planned_usd"]))
        return [f"{r['model']} @ {budget_label(r['budget'])}: {usd_text(r['realised_usd'])} vs "
                f"{usd_text(r['planned_usd'])} (×{r['realised_over_planned']:.3f}, "
                f"{r['matched']:,} rows)" for r in rows[:TOP_ARMS]]


def _unusable_note(rec: Reconciliation) -> str:
    """Why the most common unusable actuals rows were set aside, and where the first one is:
    with every row bad (output_tokens "five"), 'is it the right run?' alone named no row."""
    if not rec.invalid:
        return ""
    reason, rows = max(rec.invalid.items(), key=lambda item: item[1])
    return (f" {sum(rec.invalid.values()):,} actuals row(s) unusable, most often ({rows:,}): "
            f"{reason} (first: {rec.invalid_first[reason]}).")


def reconcile_run(run_uri: str, actuals_uri: str, catalog_path: str | None = None,
                  tracking_uri: str | None = None) -> ReconcileResult:
    """Reconcile the committed run in the folder ``run_uri`` (``<output>/<run_id>``) with the
    actuals at ``actuals_uri``; write the report, plot and correction beside it."""
    manifest = committed_manifest(run_uri)
    catalog = run_catalog(manifest, catalog_path, tracking_uri)
    with storage.reporting(f"cannot read the routed rows of {redact_uri(run_uri)}"):
        routed = read_routed(manifest)
    priced_with = applied_correction(run_uri, manifest)
    rec = reconcile(manifest, routed, read_actuals(actuals_uri), catalog,
                    None if priced_with is None else priced_with.factors_for(catalog))
    if rec.counts["matched"] == 0:
        raise R2RayError(f"none of the {rec.counts['actuals_usable']:,} usable actuals rows in "
                         f"{redact_uri(actuals_uri)} matches a routed (query_id, model, budget) of "
                         f"run {rec.run_id}: is it the right run?{_unusable_note(rec)} Nothing "
                         "was written")
    correction = fit_correction(rec, priced_with=priced_with)
    with storage.reporting(f"cannot write to {redact_uri(run_uri)}"):
        written = write_reconciliation(run_uri, rec, correction, tracking_uri)
    return ReconcileResult(rec, correction, written)


def applied_correction(run_uri: str, manifest: dict) -> CostCorrection | None:
    """The correction the run's ĉ was priced with (None: none applied), read from
    ``<output>/<source run>/reconcile/<version>/``."""
    import posixpath

    record = manifest.get("spend", {}).get("cost_correction") or {}
    if not record.get("applied"):
        return None
    root = posixpath.dirname(run_uri.rstrip("/"))
    uri = storage.join(correction_folder(storage.join(root, record["source_run_id"]),
                                         record["version"]), CORRECTION_FILE)
    with storage.reporting(f"cannot read the cost correction run {manifest.get('run_id')} "
                           f"was priced with ({redact_uri(uri)})"):
        if not storage.exists(uri):
            raise R2RayError(f"run {manifest.get('run_id')} was priced with cost correction "
                             f"{record['version']}, which is not at {redact_uri(uri)}: without "
                             "it a new correction cannot be fitted")
        return CostCorrection.from_json(storage.read_bytes(uri).decode("utf-8"), uri)


def committed_manifest(run_uri: str) -> dict:
    """The manifest of the committed run in ``run_uri``; an error when there is none."""
    uri = storage.join(run_uri, MANIFEST)
    with storage.reporting(f"cannot read the run {redact_uri(run_uri)}"):
        if not storage.exists(uri):
            raise R2RayError(f"{redact_uri(run_uri)} holds no committed run (no {MANIFEST}); give "
                             "--run OUTPUT/RUN_ID of a run r2ray route committed")
        manifest = read_manifest(uri)
    if not manifest.get("counts", {}).get("routed"):
        raise R2RayError(f"run {manifest.get('run_id')} routed no query: nothing to reconcile")
    return manifest


def run_catalog(manifest: dict, catalog_path: str | None = None,
                tracking_uri: str | None = None) -> Catalog:
    """The catalogue the run was priced with: ``catalog_path``, else the run's own ``--catalog``,
    else the one its model carries; its fingerprint must be the manifest's."""
    run_path = manifest.get("config", {}).get("catalog")
    if catalog_path or run_path:
        path = catalog_path or run_path
        source = f"--catalog {path}" if catalog_path else f"the run's --catalog {path}"
        catalog = load_catalog(path)
    else:
        source = f"the catalogue of model {run_model_uri(manifest)}"
        catalog = _model_catalog(manifest, tracking_uri)
    check_catalog(manifest, catalog, redact_uri(source))
    return catalog


def _model_catalog(manifest: dict, tracking_uri: str | None) -> Catalog:
    from r2ray.predictor.persist import read_predictor_config, saved_catalog

    uri = manifest["model"]["uri"]
    if not uri.startswith("models:/"):   # a saved-predictor folder: its JSON carries the catalogue
        return saved_catalog(read_predictor_config(uri), uri)
    from r2ray.registry import load_registered

    stored = manifest.get("config", {}).get("tracking_uri")
    stored = stored if stored and MASK not in stored else None
    return load_registered(run_model_uri(manifest), tracking_uri or stored, device="cpu").catalog


def run_model_uri(manifest: dict) -> str:
    """The model the run used: ``models:/NAME/VERSION``, the version its manifest records, for a
    run of ``models:/NAME@ALIAS`` (or ``/latest``), which may name another version since (a
    promotion: the holder's catalogue was refused as not the run's); the URI as given for a
    folder, or a manifest that records no version."""
    model = manifest["model"]
    uri, name, version = model["uri"], model.get("name"), model.get("version")
    if not uri.startswith("models:/") or not (name and version):
        return uri
    return f"models:/{name}/{version}"
