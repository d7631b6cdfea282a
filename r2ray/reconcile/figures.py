"""Planned against realised: join a committed run's routed rows with their actuals; the figures.

Every routed row is keyed by ``(query_id, model, budget)`` (budget in output tokens, 0 for the
default arm, as :mod:`r2ray.batch.assign` writes it); each usable actual with the same key bills
it (usable: valid, and billed to this run or naming none; another run's rows are marked invalid by
:func:`r2ray.reconcile.actuals.mark_other_runs`). Realised cost (USD) is the actual's ``cost_usd``
when given, else input tokens × input price + output tokens × output price at the run's
catalogue. Money is summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from r2ray import storage
from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.reconcile.actuals import (DUPLICATE, KEY, arm_index, check_run_ids, invalid_counts,
                                     mark_duplicates, mark_other_runs, mark_unknown_arms)

ROUTED_COLUMNS = ["query_id", "model", "budget", "max_tokens", "q_hat", "t_hat", "c_hat_usd"]
GROUP_COLUMNS = ["routed", "matched", "planned_usd", "planned_raw_usd", "planned_all_usd",
                 "realised_usd",
                 "realised_over_planned", "mean_q_hat", "rated", "mean_q_hat_rated",
                 "mean_quality"]


class CatalogMismatch(R2RayError):
    """The catalogue given is not the one the run was priced with."""


@dataclass(frozen=True)
class Reconciliation:
    """A committed run's planned spend and quality against what its actuals say.

    ``overall`` (USD, ratios, means) and ``counts`` (rows) are flat dicts; ``by_arm`` and
    ``by_model`` are tables with ``GROUP_COLUMNS`` after their key (``model``, ``budget``):
    ``planned_usd`` Σ ĉ of the matched routed rows, ``planned_all_usd`` Σ ĉ of all routed rows,
    ``realised_usd`` Σ realised cost of the matched rows, ``mean_q_hat`` over the matched rows,
    ``mean_q_hat_rated`` and ``mean_quality`` over the ``rated`` ones (actuals with a quality).
    ``overall["not_routed_usd"]``: Σ billed to usable actuals of no routed row (not in
    ``realised_usd``); ``overall["duplicate_usd"]``: Σ billed to rows repeating the key of an
    earlier usable actual (a retried call billed twice: money spent, not in ``realised_usd``).
    """

    run_id: str
    model_label: str
    catalog_fingerprint: str
    budget_usd: float
    counts: dict[str, int]
    invalid: dict[str, int]          # reason → actuals rows
    invalid_first: dict[str, str]    # reason → where its first row is
    overall: dict[str, float]
    by_arm: pa.Table
    by_model: pa.Table
    actuals_sources: tuple[str, ...] = ()
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None  # the run's, as its manifest stores it (redacted)
    model_fingerprint: str | None = None  # the predictor's document_sha256 (None: a run
                                          # committed before it was recorded)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: the overall figures and the counts."""
        figures = {k: v for k, v in self.overall.items() if np.isfinite(v)}
        counts = {k: v for k, v in self.counts.items()}
        return figures | counts | {"invalid_actuals": sum(self.invalid.values())}


def model_label(manifest: dict) -> str:
    """``NAME/VERSION`` of a registered model, the folder of a local one (as routed rows say):
    the manifest's ``label`` (runs committed before it was recorded: from the URI as typed)."""
    model = manifest["model"]
    if model.get("label"):
        return model["label"]
    return model["uri"] if model["version"] == "local" else f"{model['name']}/{model['version']}"


def check_catalog(manifest: dict, catalog: Catalog, source: str = "the catalogue") -> None:
    expected = manifest["catalog_fingerprint"]
    if catalog.fingerprint != expected:
        raise CatalogMismatch(
            f"{source} (fingerprint {catalog.fingerprint[:12]}…) is not the catalogue run "
            f"{manifest['run_id']} was priced with ({expected[:12]}…); give the run's --catalog")


def read_routed(manifest: dict) -> pa.Table:
    """Every routed row of a committed run (ROUTED_COLUMNS), from its ``output.routed`` folder."""
    uri = manifest["output"]["routed"]
    if not storage.exists(uri):   # a run whose every row was quarantined or deferred
        return _routed_schema().empty_table()
    tables = []
    for part in storage.list_files(uri, (".parquet",)):
        fs, path = storage.filesystem(part)  # one file at a time: model=<name> is no column here
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle, columns=ROUTED_COLUMNS))
    return pa.concat_tables(tables).cast(_routed_schema())


def _routed_schema() -> pa.Schema:
    from r2ray.batch.assign import ROUTED_SCHEMA

    return pa.schema([ROUTED_SCHEMA.field(name) for name in ROUTED_COLUMNS])


def priced_usd(catalog: Catalog, arm: np.ndarray, input_tokens: np.ndarray,
               output_tokens: np.ndarray) -> np.ndarray:
    """USD [R]: input tokens × input price + output tokens × output price of each row's arm."""
    prices = catalog.arm_arrays
    return (np.asarray(input_tokens, np.float64) * prices["price_in_usd"][arm]
            + np.asarray(output_tokens, np.float64) * prices["price_out_usd"][arm])


def reconcile(manifest: dict, routed: pa.Table, actuals: pa.Table, catalog: Catalog,
              applied_factors: np.ndarray | None = None) -> Reconciliation:
    """Join ``routed`` (ROUTED_COLUMNS) with ``actuals`` (ACTUALS_SCHEMA) on (query_id, model,
    budget); ``catalog`` must be the run's (its fingerprint is checked). Rows billed to another
    run are invalid (none of the run's: refused). ``applied_factors`` [K]: the cost correction
    the run's ĉ was multiplied by (``planned_raw_usd`` divides it out)."""
    check_catalog(manifest, catalog)
    run_id = manifest["run_id"]
    check_run_ids(actuals, run_id, ", ".join(pc.unique(actuals.column("source")).to_pylist()))
    unchecked = actuals.column("run_id").null_count
    actuals = mark_duplicates(mark_unknown_arms(mark_other_runs(actuals, run_id), catalog))
    invalid, first = invalid_counts(actuals)
    usable = actuals.filter(pc.is_null(actuals["invalid"]))
    rows = _joined(routed, usable, catalog)
    factors = (np.ones(catalog.n_arms) if applied_factors is None
               else np.asarray(applied_factors, np.float64))
    rows["c_hat_raw"] = rows["c_hat"] / factors[rows["arm"]]
    matched = int(rows["matched"].sum())
    counts = {"routed": routed.num_rows, "matched": matched,
              "routed_without_actuals": routed.num_rows - matched,
              "actuals_rows": actuals.num_rows, "actuals_usable": usable.num_rows,
              "actuals_not_routed": usable.num_rows - matched,
              "priced_from_catalogue": int((rows["matched"] & rows["priced"]).sum()),
              "actuals_run_unchecked": unchecked}
    budget_usd = float(manifest["spend"]["budget_usd"])
    whole = _group_figures(rows, np.zeros(routed.num_rows, np.int64), 1)   # one group: all rows
    overall = {name: float(whole[name][0]) for name in GROUP_COLUMNS if name not in counts}
    overall |= _spend_figures(rows, whole, budget_usd)
    overall["not_routed_usd"] = _not_routed_usd(routed, usable, catalog)
    overall["duplicate_usd"] = _billed_total_usd(
        actuals.filter(pc.equal(actuals["invalid"], DUPLICATE)), catalog)
    return Reconciliation(
        run_id=manifest["run_id"], model_label=model_label(manifest),
        catalog_fingerprint=catalog.fingerprint, budget_usd=budget_usd, counts=counts,
        invalid=invalid, invalid_first=first, overall=overall,
        by_arm=_group_table(rows, catalog, by_model=False),
        by_model=_group_table(rows, catalog, by_model=True),
        actuals_sources=tuple(pc.unique(actuals.column("source")).to_pylist()),
        mlflow_run_id=manifest.get("mlflow_run_id"),
        tracking_uri=manifest.get("config", {}).get("tracking_uri"),
        model_fingerprint=manifest["model"].get("fingerprint"))


def _joined(routed: pa.Table, usable: pa.Table, catalog: Catalog) -> dict[str, np.ndarray]:
    """Per routed row [N]: arm, ĉ and q̂, whether an actual matched, and its cost and quality."""
    position = pa.array(np.arange(routed.num_rows), pa.int64())
    left = _routed_keys(routed, usable)
    right = usable.select([*KEY, "input_tokens", "output_tokens", "quality", "cost_usd"])
    found = left.append_column("_position", position).join(right, KEY, join_type="inner",
                                                            use_threads=False)
    at = found.column("_position").to_numpy()
    arm = arm_index(catalog, routed.column("model"), routed.column("budget"))
    if (arm < 0).any():
        raise CatalogMismatch("routed rows name arms outside the run's catalogue")
    n = routed.num_rows
    column = lambda name: found.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    recorded = np.asarray(column("cost_usd"), np.float64)
    tokens_in = column("input_tokens")
    out = {"arm": arm, "model_index": catalog.arm_arrays["model_index"][arm].astype(np.int64),
           "c_hat": routed.column("c_hat_usd").to_numpy().astype(np.float64),
           "q_hat": routed.column("q_hat").to_numpy().astype(np.float64),
           "matched": np.zeros(n, bool), "priced": np.zeros(n, bool),
           "cost": np.zeros(n), "quality": np.full(n, np.nan), "worst": np.zeros(n)}
    out["matched"][at] = True
    out["priced"][at] = np.isnan(recorded)
    out["cost"][at] = _billed_usd(catalog, arm[at], recorded, tokens_in, column("output_tokens"))
    out["quality"][at] = np.asarray(column("quality"), np.float64)
    out["worst"][at] = priced_usd(catalog, arm[at], tokens_in,
                                  routed.column("max_tokens").to_numpy()[at])
    return out


def _routed_keys(routed: pa.Table, usable: pa.Table) -> pa.Table:
    """The routed rows' (query_id, model, budget), typed as the actuals' to join on them."""
    return routed.select(KEY).cast(pa.schema([usable.schema.field(k) for k in KEY]))


def _billed_usd(catalog: Catalog, arm: np.ndarray, recorded_usd: np.ndarray,
                input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """USD [R] each actual billed: its ``cost_usd``, else its tokens at its arm's prices."""
    priced = priced_usd(catalog, arm, input_tokens, output_tokens)
    return np.where(np.isnan(recorded_usd), priced, recorded_usd)


def _not_routed_usd(routed: pa.Table, usable: pa.Table, catalog: Catalog) -> float:
    """Σ USD (float64) billed to usable actuals whose key no routed row has (a deferred query run
    anyway, another run's query): money really spent that no planned figure holds."""
    return _billed_total_usd(usable.join(_routed_keys(routed, usable), KEY,
                                         join_type="left anti", use_threads=False), catalog)


def _billed_total_usd(actuals: pa.Table, catalog: Catalog) -> float:
    """Σ USD (float64) the ``actuals`` rows (each of a catalogue arm, with its tokens) billed."""
    column = lambda name: actuals.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    billed = _billed_usd(catalog, arm_index(catalog, actuals.column("model"),
                                            actuals.column("budget")),
                         np.asarray(column("cost_usd"), np.float64), column("input_tokens"),
                         column("output_tokens"))
    return float(billed.sum(dtype=np.float64))


def _group_figures(rows: dict, group: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """GROUP_COLUMNS [G] for routed rows labelled ``group`` [N] in 0..n_groups-1."""
    matched, rated = rows["matched"], rows["matched"] & ~np.isnan(rows["quality"])
    total = lambda values, where: np.bincount(  # noqa: E731
        group, weights=np.where(where, values, 0.0), minlength=n_groups)
    count = lambda where: np.bincount(group, weights=where.astype(float),  # noqa: E731
                                      minlength=n_groups)
    planned, realised = total(rows["c_hat"], matched), total(rows["cost"], matched)
    n_matched, n_rated = count(matched), count(rated)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"routed": count(np.ones_like(matched)).astype(np.int64),
                "matched": n_matched.astype(np.int64),
                "planned_usd": planned,
                "planned_raw_usd": total(rows["c_hat_raw"], matched),
                "planned_all_usd": total(rows["c_hat"], np.ones_like(matched)),
                "realised_usd": realised,
                "realised_over_planned": realised / planned,
                "mean_q_hat": total(rows["q_hat"], matched) / n_matched,
                "rated": n_rated.astype(np.int64),
                "mean_q_hat_rated": total(rows["q_hat"], rated) / n_rated,
                "mean_quality": total(np.nan_to_num(rows["quality"]), rated) / n_rated}


def _spend_figures(rows: dict, overall: dict, budget_usd: float) -> dict[str, float]:
    """Against the budget (USD): realised so far, and projected to every routed row at the
    matched rows' realised / planned ratio; the most the matched rows could have cost at
    their ``max_tokens`` caps."""
    realised = float(overall["realised_usd"][0])
    projected = float(overall["realised_over_planned"][0] * overall["planned_all_usd"][0])
    per_budget = np.float64(budget_usd) if budget_usd > 0 else np.nan   # no routed row: no budget
    return {"budget_usd": budget_usd,
            "realised_over_budget": float(realised / per_budget),
            "projected_usd": projected,
            "projected_over_budget": float(projected / per_budget),
            "worst_case_usd": float(rows["worst"].sum(dtype=np.float64))}


def _group_table(rows: dict, catalog: Catalog, by_model: bool) -> pa.Table:
    """One row per arm (or model) that was routed to, largest realised spend first."""
    if by_model:
        keys = {"model": np.array(catalog.model_names, dtype=object)}
        figures = _group_figures(rows, rows["model_index"], len(catalog.model_names))
    else:
        keys = {"model": np.array([a.model for a in catalog.arms], dtype=object),
                "budget": catalog.arm_arrays["budget_tokens"]}
        figures = _group_figures(rows, rows["arm"], catalog.n_arms)
    used = figures["routed"] > 0
    table = pa.table({name: values[used] for name, values in (keys | figures).items()})
    table = table.set_column(0, "model", table.column("model").cast(pa.string()))
    return table.sort_by([("realised_usd", "descending"), ("planned_all_usd", "descending"),
                          ("model", "ascending")])
