"""Reconciliation: actuals read and checked, joined with routed rows, the figures, the cost
correction and where it is found, the report files and the `r2ray reconcile` command."""

import dataclasses
import datetime as dt
import decimal
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pytest

from r2ray.bench.io import write_table
from r2ray.catalog import catalog_from_dict, save_catalog
from r2ray.cli import EXIT_USER_ERROR, main
from r2ray.prompting import instruction_tokens_estimate
from r2ray.reconcile import (ActualsError, CatalogMismatch, CorrectionError, CostCorrection,
                             actuals_from_table, fit_correction, latest_correction, model_label,
                             read_actuals, reconcile, write_reconciliation)
from r2ray.reconcile.report import report_markdown
from r2ray.reconcile.run import reconcile_run

CATALOG = {"budgets": [100, "default"], "models": [
    {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 8192},
    {"name": "large", "input_per_m": 10.0, "output_per_m": 30.0, "context": 8192}]}
P_IN = {"small": 1e-6, "large": 10e-6}     # USD per token
P_OUT = {"small": 2e-6, "large": 30e-6}
ROUTED = [  # query_id, model, budget, max_tokens, q̂, ĉ (USD)
    ("q1", "small", 100, 110, 0.5, 1e-4), ("q2", "small", 0, 4000, 0.625, 2e-4),
    ("q3", "large", 100, 110, 0.75, 1e-3), ("q4", "large", 100, 110, 0.875, 2e-3),
    ("q5", "large", 0, 4000, 0.25, 5e-3)]   # q5 has no actual
GOOD_ACTUALS = [
    {"query_id": "q1", "model": "small", "budget": 100, "input_tokens": 10, "output_tokens": 40,
     "quality": 1.0, "cost_usd": None},                                   # priced: 9e-5
    {"query_id": "q2", "model": "small", "budget": 0, "input_tokens": 20, "output_tokens": 100,
     "quality": None, "cost_usd": 3e-4},
    {"query_id": "q3", "model": "large", "budget": 100, "input_tokens": 10, "output_tokens": 50,
     "quality": 0.5, "cost_usd": None},                                   # priced: 1.6e-3
    {"query_id": "q4", "model": "large", "budget": 100, "input_tokens": 0, "output_tokens": 100,
     "quality": 1.0, "cost_usd": 1e-3},
    {"query_id": "q9", "model": "small", "budget": 100, "input_tokens": 1, "output_tokens": 1,
     "quality": None, "cost_usd": None},                                  # of no routed row
]


def _catalog():
    return catalog_from_dict(CATALOG)


def _routed(rows=ROUTED) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table({"query_id": pa.array(columns[0], pa.string()),
                     "model": pa.array(columns[1], pa.string()),
                     "budget": pa.array(columns[2], pa.int32()),
                     "max_tokens": pa.array(columns[3], pa.int64()),
                     "q_hat": pa.array(columns[4], pa.float32()),
                     "t_hat": pa.array([1.0] * len(rows), pa.float32()),
                     "c_hat_usd": pa.array(columns[5], pa.float64())})


def _manifest(catalog, routed_uri="(unused)", **extra) -> dict:
    return {"run_id": "night", "catalog_fingerprint": catalog.fingerprint,
            "spend": {"budget_usd": 0.01}, "counts": {"routed": len(ROUTED)},
            "model": {"uri": "/models/m", "name": "/models/m", "version": "local"},
            "output": {"routed": routed_uri}, "config": {}, "mlflow_run_id": None} | extra


def _write_actuals(rows: list[dict], path) -> str:
    if str(path).endswith(".parquet"):
        write_table(pa.Table.from_pylist(rows), str(path))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("name, default", [("a.parquet", 0), ("a.jsonl", 0),
                                           ("a.jsonl", "default")])
def test_join_and_figures_on_hand_built_tables(tmp_path, name, default):
    rows = [dict(r, budget=default) if r["query_id"] == "q2" else r for r in GOOD_ACTUALS]
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    read_actuals(_write_actuals(rows, tmp_path / name)), catalog)
    realised = [10 * 1e-6 + 40 * 2e-6, 3e-4, 10 * 10e-6 + 50 * 30e-6, 1e-3]
    planned = [1e-4, 2e-4, 1e-3, 2e-3]
    assert rec.counts == {"routed": 5, "matched": 4, "routed_without_actuals": 1,
                          "actuals_rows": 5, "actuals_usable": 5, "actuals_not_routed": 1,
                          "priced_from_catalogue": 2, "actuals_run_unchecked": 5}
    assert rec.invalid == {}
    figures = rec.overall
    assert figures["planned_usd"] == pytest.approx(sum(planned), rel=1e-12)
    assert figures["planned_all_usd"] == pytest.approx(sum(planned) + 5e-3, rel=1e-12)
    assert figures["realised_usd"] == pytest.approx(sum(realised), rel=1e-12)
    assert figures["realised_over_planned"] == pytest.approx(sum(realised) / sum(planned))
    assert figures["realised_over_budget"] == pytest.approx(sum(realised) / 0.01)
    assert figures["projected_usd"] == pytest.approx(sum(realised) / sum(planned) * 8.3e-3)
    worst = [10e-6 + 110 * 2e-6, 20e-6 + 4000 * 2e-6, 100e-6 + 110 * 30e-6, 110 * 30e-6]
    assert figures["worst_case_usd"] == pytest.approx(sum(worst), rel=1e-12)
    assert figures["mean_q_hat"] == pytest.approx((0.5 + 0.625 + 0.75 + 0.875) / 4)
    assert figures["rated"] == 3
    assert figures["mean_q_hat_rated"] == pytest.approx((0.5 + 0.75 + 0.875) / 3)
    assert figures["mean_quality"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    by_arm = {(r["model"], r["budget"]): r for r in rec.by_arm.to_pylist()}
    assert set(by_arm) == {("small", 100), ("small", 0), ("large", 100), ("large", 0)}
    assert by_arm[("large", 100)]["realised_usd"] == pytest.approx(realised[2] + realised[3])
    assert by_arm[("large", 100)]["mean_quality"] == pytest.approx(0.75)
    assert by_arm[("large", 0)]["matched"] == 0 and by_arm[("large", 0)]["routed"] == 1
    by_model = {r["model"]: r for r in rec.by_model.to_pylist()}
    assert by_model["small"]["realised_usd"] == pytest.approx(realised[0] + realised[1])
    assert by_model["large"]["planned_all_usd"] == pytest.approx(8e-3)
    assert rec.by_arm.column("realised_usd").to_pylist() == sorted(
        rec.by_arm.column("realised_usd").to_pylist(), reverse=True)


def test_cost_usd_absent_means_every_row_is_priced_from_the_catalogue():
    rows = [{k: v for k, v in r.items() if k != "cost_usd"} for r in GOOD_ACTUALS]
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(rows), "mem"), catalog)
    priced = sum(r["input_tokens"] * P_IN[r["model"]] + r["output_tokens"] * P_OUT[r["model"]]
                 for r in rows[:4])
    assert rec.counts["priced_from_catalogue"] == 4
    assert rec.overall["realised_usd"] == pytest.approx(priced, rel=1e-12)


def test_a_missing_column_names_it_and_the_file(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "output_tokens"} for r in GOOD_ACTUALS]
    path = _write_actuals(rows, tmp_path / "usage.parquet")
    with pytest.raises(ActualsError, match=r"usage\.parquet: missing column\(s\) "
                                           r"\['output_tokens'\]"):
        read_actuals(path)


def test_bad_rows_are_counted_with_their_reason_and_never_used(tmp_path):
    good = GOOD_ACTUALS[0]
    lines = [json.dumps(r) for r in [
        good,
        dict(good, query_id=None),
        dict(good, query_id="b", model=" "),
        dict(good, query_id="c", budget="lots"),
        dict(good, query_id="d", budget=-5),
        dict(good, query_id="e", input_tokens=None),
        dict(good, query_id="f", output_tokens=2.5),
        dict(good, query_id="g", quality=1.5),
        dict(good, query_id="h", cost_usd=-1.0),
    ]] + ["this is not json", json.dumps(dict(good, query_id="i", model="medium")),
          json.dumps(dict(good, query_id="j", budget=7)), json.dumps(dict(good, quality=0.0))]
    path = tmp_path / "usage.jsonl"
    path.write_text("\n".join(lines) + "\n")
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(), read_actuals(str(path)), catalog)
    assert rec.invalid == {
        "missing query_id": 1, "missing model": 1,
        "budget is not 'default' or a non-negative integer": 2,
        "input_tokens missing, negative or not an integer": 1,
        "output_tokens missing, negative or not an integer": 1,
        "quality outside [0, 1]": 1, "cost_usd negative or infinite": 1,
        "not a JSON object": 1,
        "(model, budget) is not an arm of the run's catalogue": 2,
        "duplicate (query_id, model, budget)": 1}
    assert rec.invalid_first["duplicate (query_id, model, budget)"] == f"{path} row 13"
    assert rec.invalid_first["not a JSON object"] == f"{path} row 10"
    assert rec.counts["actuals_rows"] == 13 and rec.counts["actuals_usable"] == 1
    assert rec.counts["matched"] == 1
    assert rec.overall["mean_quality"] == 1.0   # the first q1 row counts, not its repeat


def test_the_catalogue_must_be_the_runs():
    catalog = _catalog()
    repriced = catalog_from_dict({**CATALOG, "models": [dict(CATALOG["models"][0], output_per_m=3),
                                                        CATALOG["models"][1]]})
    with pytest.raises(CatalogMismatch, match="is not the catalogue run night was priced with"):
        reconcile(_manifest(catalog), _routed(), actuals_from_table(
            pa.Table.from_pylist(GOOD_ACTUALS), "mem"), repriced)


def _scaled_run(arms: dict) -> tuple[pa.Table, pa.Table]:
    """{(model, budget): (rows, ĉ USD, realised USD per row)} → routed rows and their actuals."""
    routed, actuals = [], []
    for (model, budget), (n, c_hat, cost) in arms.items():
        for i in range(n):
            qid = f"{model}-{budget}-{i}"
            routed.append((qid, model, budget, 110, 0.5, c_hat))
            actuals.append({"query_id": qid, "model": model, "budget": budget,
                            "input_tokens": 1, "output_tokens": 1, "cost_usd": cost})
    return _routed(routed), actuals_from_table(pa.Table.from_pylist(actuals), "mem")


def test_the_correction_shrinks_few_rows_toward_their_parent():
    arms = {("small", 100): (1000, 1e-4, 1e-4),     # ratio 1
            ("small", 0): (1000, 1e-4, 1e-3),       # ratio 10: clipped
            ("large", 100): (1000, 1e-3, 2e-3),     # ratio 2, many rows
            ("large", 0): (1, 1e-3, 0.5e-3)}        # ratio 0.5, one row
    catalog = _catalog()
    routed, actuals = _scaled_run(arms)
    correction = fit_correction(reconcile(_manifest(catalog), routed, actuals, catalog))
    m = 20.0

    def shrink(realised, planned, n, parent):
        return (n * realised / planned + m * parent) / (n + m)

    overall = shrink(0.1 + 1.0 + 2.0 + 0.0005, 0.1 + 0.1 + 1.0 + 0.001, 3001, 1.0)
    large = shrink(2.0005, 1.001, 1001, overall)
    small = min(shrink(1.1, 0.2, 2000, overall), 4.0)
    factors = {(f.model, f.budget): f.factor for f in correction.arms}
    assert correction.overall == pytest.approx(overall)
    assert {f.model: f.factor for f in correction.models} == pytest.approx(
        {"large": large, "small": small})
    assert small == 4.0 and factors[("small", 0)] == 4.0                  # clipped
    assert factors[("small", 100)] == pytest.approx(shrink(0.1, 0.1, 1000, small))
    assert factors[("large", 100)] == pytest.approx(shrink(2.0, 1.0, 1000, large))
    assert factors[("large", 100)] == pytest.approx(2.0, abs=0.02)        # ≈ its own ratio
    assert factors[("large", 0)] == pytest.approx(shrink(0.0005, 0.001, 1, large))
    assert abs(factors[("large", 0)] - large) < 0.1 * large               # ≈ its parent
    assert correction.rows == 3001 and correction.source_run_id == "night"
    assert correction.model_label == "/models/m"
    assert correction.catalog_fingerprint == catalog.fingerprint


def test_factors_for_any_catalogue_and_the_json_round_trip():
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)
    correction = fit_correction(rec, now=dt.datetime(2026, 11, 30, 2, 15, tzinfo=dt.timezone.utc))
    assert correction.version.startswith("20261130T021500Z-") and len(correction.version) == 25
    assert CostCorrection.from_json(correction.to_json()) == correction
    arm = {(f.model, f.budget): f.factor for f in correction.arms}
    model = {f.model: f.factor for f in correction.models}
    assert set(arm) == {("small", 100), ("small", 0), ("large", 100)}   # large/default: no actual
    other = catalog_from_dict({"budgets": [50, 100, "default"], "models": [
        CATALOG["models"][1], {"name": "extra", "input_per_m": 1, "output_per_m": 1,
                               "context": 1000}, CATALOG["models"][0]]})
    expected = [model["large"], arm[("large", 100)], model["large"], 1.0, 1.0, 1.0,
                model["small"], arm[("small", 100)], arm[("small", 0)]]
    factors = correction.factors_for(other)
    assert factors.dtype == np.float64 and factors.tolist() == expected
    assert correction.factors_for(catalog).tolist() == [
        arm[("small", 100)], arm[("small", 0)], arm[("large", 100)], model["large"]]
    with pytest.raises(CorrectionError, match="not a cost correction"):
        CostCorrection.from_json("{\"format\": 1}", "c.json")
    with pytest.raises(CorrectionError, match="format 2"):
        CostCorrection.from_json(json.dumps({**json.loads(correction.to_json()), "format": 2}))
    with pytest.raises(CorrectionError, match="finite and positive"):
        CostCorrection.from_json(json.dumps({**json.loads(correction.to_json()), "overall": -1}))


def _corrections(tmp_path):
    """(catalogue, ``made(day, run, committed=True, **changes)``): writes a correction fitted on
    day ``day`` of November under ``tmp_path/out/<run>/reconcile/``, its run committed or not."""
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)

    def made(day: int, run: str, committed: bool = True, **changes) -> CostCorrection:
        when = dt.datetime(2026, 11, day, tzinfo=dt.timezone.utc)
        correction = dataclasses.replace(fit_correction(rec, now=when), **changes)
        folder = tmp_path / "out" / run / "reconcile" / correction.version
        folder.mkdir(parents=True)
        (folder / "correction.json").write_text(correction.to_json())
        if committed:
            (tmp_path / "out" / run / "manifest.json").write_text("{}")
        return correction

    return catalog, made


def test_latest_correction_picks_the_newest_for_the_model_and_catalogue(tmp_path):
    catalog, made = _corrections(tmp_path)
    assert latest_correction(str(tmp_path / "out"), "/models/m", catalog.fingerprint,
                             None) is None
    made(1, "run-a")
    newest = made(2, "run-b")
    made(3, "run-c", model_label="models/other/2")                       # another model
    made(4, "run-d", catalog_fingerprint="0" * 64)                       # another catalogue
    made(5, "run-e", committed=False)                                    # not a committed run
    garbled = tmp_path / "out" / "run-a" / "reconcile" / "x" / "correction.json"
    garbled.parent.mkdir(parents=True)
    garbled.write_text("not json")
    found = latest_correction(str(tmp_path / "out"), "/models/m", catalog.fingerprint, None)
    assert found == newest
    assert latest_correction(str(tmp_path / "out"), "models/other/2",
                             catalog.fingerprint, None).created_at.startswith("2026-11-03")
    assert latest_correction(str(tmp_path / "nowhere"), "/models/m", catalog.fingerprint,
                             None) is None


def test_serve_prices_with_the_correction_of_the_run_whose_lambda_it_serves(tmp_path, caplog):
    """Serve took the newest correction whatever the served run had used: λ* of a run that
    applied none (or an older one) was paired with other factors, and Serve and that run chose
    other arms at the same λ*."""
    from r2ray.serving.pacer import SolvedFor
    from r2ray.serving.router import served_correction

    catalog, made = _corrections(tmp_path)
    older, newest = made(1, "run-a"), made(2, "run-b")
    out, fp = str(tmp_path / "out"), catalog.fingerprint

    def served(solved_for):
        found = served_correction(out, "/models/m", fp, None, solved_for)
        return None if found is None else found.version

    assert served(SolvedFor("/models/m", fp, correction=older.version)) == older.version
    assert served(SolvedFor("/models/m", fp, correction="")) is None   # the run applied none
    assert served(None) == newest.version                              # no run served
    assert served(SolvedFor("/models/m", fp)) == newest.version        # not recorded
    assert served(SolvedFor("models/m/2", fp, correction="")) == newest.version  # another model
    with caplog.at_level(logging.WARNING):
        assert served(SolvedFor("/models/m", fp, correction="gone")) == newest.version
    assert "cost correction gone, which priced the served run, is not under" in caplog.text
    applied = {"spend": {"cost_correction": {"applied": True, "version": older.version}}}
    assert SolvedFor.of(applied).correction == older.version
    assert SolvedFor.of({"spend": {"cost_correction": {"applied": False}}}).correction == ""
    assert SolvedFor.of({}).correction is None


def test_latest_correction_looks_under_its_own_output_only(tmp_path):
    # before the fix: an output named out[1] took out1's correction (its glob read [1] as a
    # wildcard), so a route there priced its solve with another output's factors
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)
    for output, day in (("out1", 2), ("out[1]", 1)):
        correction = fit_correction(rec, now=dt.datetime(2026, 11, day, tzinfo=dt.timezone.utc))
        folder = tmp_path / output / "night" / "reconcile" / correction.version
        folder.mkdir(parents=True)
        (folder / "correction.json").write_text(correction.to_json())
        (tmp_path / output / "night" / "manifest.json").write_text("{}")
    found = latest_correction(str(tmp_path / "out[1]"), "/models/m", catalog.fingerprint, None)
    assert found.created_at.startswith("2026-11-01")   # its own, though out1's is newer


def test_an_unreachable_tracking_server_only_warns(tmp_path, monkeypatch, capsys):
    import r2ray.reconcile.report as report

    def down(*args, **kwargs):
        raise ConnectionError("tracking down at http://user:hunter2@mlflow.example/")

    monkeypatch.setattr(report, "log_to_mlflow", down)
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)
    written = write_reconciliation(str(tmp_path / "run"), dataclasses.replace(
        rec, mlflow_run_id="abc"), fit_correction(rec))
    assert written["mlflow_run_id"] is None
    err = capsys.readouterr().err
    assert "could not log the reconciliation to MLflow" in err and "hunter2" not in err
    for name in ("report", "plot", "correction"):
        assert os.path.getsize(written[name]) > 0


def _hand_built_run(tmp_path) -> tuple[str, str]:
    """A committed run folder without Ray: manifest.json and routed rows per model."""
    catalog = _catalog()
    run = tmp_path / "out" / "night"
    routed = run / "attempt-1" / "routed"
    table = _routed()
    for model in ("small", "large"):
        write_table(table.filter(pa.compute.equal(table["model"], model)),
                    str(routed / f"model={model}" / "part-0.parquet"))
    (run / "manifest.json").write_text(json.dumps(_manifest(catalog, str(routed))))
    catalog_path = str(tmp_path / "catalog.yaml")
    save_catalog(catalog, catalog_path)
    return str(run), catalog_path


def test_the_command_on_a_hand_built_run(tmp_path, capsys):
    run, catalog_path = _hand_built_run(tmp_path)
    actuals = _write_actuals(GOOD_ACTUALS + [dict(GOOD_ACTUALS[0], model="medium")],
                             tmp_path / "usage.jsonl")
    assert main(["reconcile", "--run", run, "--actuals", actuals, "--catalog",
                 catalog_path]) == 0
    out, err = capsys.readouterr()
    assert "reconciled run night against 6 actuals rows (5 usable; invalid: (model, budget) is " \
           "not an arm of the run's catalogue: 1)" in out
    assert "routed 5: 4 matched, 1 without an actual; 1 usable actuals of no routed row" in out
    assert "largest deviations (USD): large @ 100: $0.0026 vs $0.003 (×0.867, 2 rows)" in out
    assert "has no MLflow run" in err
    [version] = os.listdir(os.path.join(run, "reconcile"))
    folder = os.path.join(run, "reconcile", version)
    assert sorted(os.listdir(folder)) == ["correction.json", "realised_vs_planned.png",
                                          "report.md"]
    report = open(os.path.join(folder, "report.md")).read()
    assert "| (model, budget) is not an arm of the run's catalogue | 1 |" in report
    assert f"## Cost correction `{version}`" in report
    found = latest_correction(os.path.dirname(run), "/models/m", _catalog().fingerprint, None)
    assert found is not None and found.version == version


def test_the_command_refuses_what_it_cannot_reconcile(tmp_path, capsys):
    run, catalog_path = _hand_built_run(tmp_path)
    good = _write_actuals(GOOD_ACTUALS, tmp_path / "usage.jsonl")
    no_tokens = _write_actuals([{k: v for k, v in r.items() if k != "input_tokens"}
                                for r in GOOD_ACTUALS], tmp_path / "bad.parquet")
    repriced = str(tmp_path / "repriced.yaml")
    save_catalog(catalog_from_dict({**CATALOG, "budgets": [100, 200, "default"]}), repriced)
    strangers = _write_actuals([dict(r, query_id="z" + r["query_id"]) for r in GOOD_ACTUALS],
                               tmp_path / "strangers.jsonl")
    cases = [
        ([str(tmp_path / "out" / "nope"), good, catalog_path], "holds no committed run"),
        ([run, no_tokens, catalog_path], r"bad.parquet: missing column(s) ['input_tokens']"),
        ([run, good, repriced], "is not the catalogue run night was priced with"),
        ([run, str(tmp_path / "absent.jsonl"), catalog_path], "does not exist"),
        ([run, strangers, catalog_path], "matches a routed (query_id, model, budget)"),
    ]
    for (run_uri, actuals, catalog), message in cases:
        assert main(["reconcile", "--run", run_uri, "--actuals", actuals, "--catalog",
                     catalog]) == EXIT_USER_ERROR
        assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "reconcile"))


def test_actuals_with_no_usable_row_say_why_not_only_is_it_the_right_run(tmp_path, capsys):
    """Every row bad (output_tokens "five"): the error asked only 'is it the right run?' and named
    no row; it gives the reason and the first row."""
    run, catalog_path = _hand_built_run(tmp_path)
    bad = _write_actuals([dict(r, output_tokens="five") for r in GOOD_ACTUALS],
                         tmp_path / "usage.jsonl")
    assert main(["reconcile", "--run", run, "--actuals", bad, "--catalog",
                 catalog_path]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert (f"{len(GOOD_ACTUALS)} actuals row(s) unusable, most often ({len(GOOD_ACTUALS)}): "
            "output_tokens missing, negative or not an integer (first: ") in err
    assert "usage.jsonl row 1)." in err


@pytest.mark.slow
def test_reconcile_a_routed_run_against_the_worlds_outcomes(tmp_path, ray_local,
                                                           small_routing_model, capsys):
    """route_batch on a synthetic-world backlog; actuals = the world's realised outcome of each
    routed arm (a few missing, some without cost_usd, some bad rows); `r2ray reconcile` in
    process; files, MLflow metrics and the correction against an independent computation."""
    from mlflow import MlflowClient

    from r2ray.batch import route_batch, route_config
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.reconcile import model_label, read_routed

    catalog, n = small_routing_model["catalog"], 300
    write_table(synth_backlog(catalog, n, seed=12, embeddings=True),
                str(tmp_path / "in" / "part-0.parquet"))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    manifest = route_batch(route_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=small_routing_model["path"],
        budget_per_query_usd=5e-5, run_id="night", workers=1, batch_size=64,
        tracking_uri=tracking))
    routed = read_routed(manifest).to_pylist()
    assert len(routed) == n == manifest["counts"]["routed"]

    world = {(r["query_id"], r["model"], r["budget"]): r
             for r in synth_bench(catalog, n, seed=12).to_pylist()}
    actuals = []
    for i, row in enumerate(routed[10:]):                 # 10 routed rows were never billed
        truth = world[(row["query_id"], row["model"], row["budget"])]
        actuals.append({k: truth[k] for k in ("query_id", "model", "budget", "input_tokens",
                                              "output_tokens", "quality")}
                       | {"cost_usd": truth["cost_usd"] if i % 2 else None})
    other = next(k for k in world if k[0] == routed[0]["query_id"] and k[1:] != (
        routed[0]["model"], routed[0]["budget"]))
    bad = [dict(actuals[0], input_tokens=-1), dict(actuals[1], model="no-such-model"), actuals[2],
           dict(actuals[3], query_id=other[0], model=other[1], budget=other[2])]
    _write_actuals(actuals + bad, tmp_path / "usage.jsonl")

    run = str(tmp_path / "out" / "night")
    assert main(["reconcile", "--run", run, "--actuals", str(tmp_path / "usage.jsonl"),
                 "--tracking-uri", tracking]) == 0      # the catalogue: the model's own
    assert "reconciled run night against 294 actuals rows" in capsys.readouterr().out

    billed = [(row, world[(row["query_id"], row["model"], row["budget"])]) for row in routed[10:]]
    price = {m.name: (m.input_per_m * 1e-6, m.output_per_m * 1e-6) for m in catalog.models}
    cost = [truth["cost_usd"] if i % 2 else truth["input_tokens"] * price[row["model"]][0]
            + truth["output_tokens"] * price[row["model"]][1]
            for i, (row, truth) in enumerate(billed)]
    planned = sum(row["c_hat_usd"] for row, _ in billed)
    expected = {"realised_usd": sum(cost), "planned_usd": planned,
                "planned_all_usd": sum(row["c_hat_usd"] for row in routed),
                "realised_over_planned": sum(cost) / planned,
                "realised_over_budget": sum(cost) / manifest["spend"]["budget_usd"],
                "mean_quality": float(np.mean([truth["quality"] for _, truth in billed])),
                "matched": n - 10, "routed_without_actuals": 10, "actuals_not_routed": 1,
                "invalid_actuals": 3}
    metrics = MlflowClient(tracking).get_run(manifest["mlflow_run_id"]).data.metrics
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-9)

    [version] = os.listdir(os.path.join(run, "reconcile"))
    folder = os.path.join(run, "reconcile", version)
    assert sorted(os.listdir(folder)) == ["correction.json", "realised_vs_planned.png",
                                          "report.md"]
    artifacts = MlflowClient(tracking).list_artifacts(manifest["mlflow_run_id"],
                                                      f"reconcile/{version}")
    assert len(artifacts) == 3
    saved = json.loads(open(os.path.join(small_routing_model["path"], "predictor.json")).read())
    assert manifest["model"]["fingerprint"] == saved["document_sha256"]   # the predictor routed
    correction = latest_correction(str(tmp_path / "out"), model_label(manifest),
                                   catalog.fingerprint, saved["document_sha256"])
    assert correction is not None and correction.version == version
    assert correction.model_fingerprint == saved["document_sha256"]
    assert correction.rows == n - 10 and correction.source_run_id == "night"
    assert correction.factors_for(catalog).shape == (catalog.n_arms,)
    assert correction.overall == pytest.approx(
        ((n - 10) * sum(cost) / planned + 20) / (n - 10 + 20))

    # the next run under the same output picks the correction up: ĉ = (input × p_in + t̂ ×
    # p_out) × the arm's factor, and the manifest names the reconciliation it used
    assert manifest["spend"]["cost_correction"] == {
        "applied": False, "reason": "no reconciliation for this model yet"}
    following = route_batch(route_config(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=small_routing_model["path"],
        budget_per_query_usd=5e-5, run_id="next-night", workers=1, batch_size=64,
        tracking_uri=tracking))
    record = following["spend"]["cost_correction"]
    assert record["applied"] and record["version"] == version and record["rows"] == n - 10
    factors = correction.factors_for(catalog)
    assert not np.allclose(factors, 1.0)
    tokens_in = dict(zip(*synth_backlog(catalog, n, seed=12).select(
        ["query_id", "input_tokens"]).to_pydict().values()))
    for row in read_routed(following).to_pylist():
        arm = catalog.arm_of(row["model"], row["budget"])
        sent = tokens_in[row["query_id"]] + instruction_tokens_estimate(row["budget"])  # + instruction
        uncorrected = (sent * price[row["model"]][0]
                       + row["t_hat"] * price[row["model"]][1])
        assert row["c_hat_usd"] == pytest.approx(uncorrected * factors[arm], rel=1e-6)

    # and so does Serve, reading corrections beside the manifest it takes λ* from
    from r2ray.routing import query_key
    from r2ray.serving.config import ServeConfig
    from r2ray.serving.router import RouteItem, load_routing_model, predict_scores

    root = ServeConfig(model=small_routing_model["path"],
                       manifest=os.path.join(run, "manifest.json")).corrections_root()
    online = load_routing_model(small_routing_model["path"], corrections=root)
    plain = load_routing_model(small_routing_model["path"])
    assert online.correction == version and plain.correction is None
    from r2ray.serving.pacer import starting_price   # the served run's own: none, then this one
    for served_run, expected in (("night", None), ("next-night", version)):
        start = starting_price(str(tmp_path / "out" / served_run / "manifest.json"), None)
        assert load_routing_model(small_routing_model["path"], corrections=root,
                                  solved_for=start.solved_for).correction == expected
    query = synth_backlog(catalog, 1, seed=12, embeddings=True).to_pylist()[0]
    item = RouteItem(query["query"], query["input_tokens"], query_key(query["query"]), 0.0,
                     embedding=query["embedding"])
    allowed = np.ones((1, catalog.n_arms), dtype=bool)
    np.testing.assert_allclose(predict_scores(online, [item], allowed).cost_usd,
                               predict_scores(plain, [item], allowed).cost_usd * factors[None],
                               rtol=1e-12)


def test_no_cost_correction_turns_the_pickup_off(tmp_path):
    from r2ray.batch import route_config
    from r2ray.batch.job import correction_record, find_correction

    config = route_config(input="in", output=str(tmp_path), model="m", budget_usd=1.0,
                          cost_correction=False)
    assert find_correction(config, model=None) is None
    assert correction_record(None, config) == {"applied": False,
                                               "reason": "turned off (--no-cost-correction)"}


def test_a_strict_budget_run_says_the_correction_did_not_price_its_solve():
    """--strict-budget spends each arm's worst case at its cap, which the factors do not change:
    the record keeps ``applied`` (its c_hat_usd carry them: reconcile divides them out) and says
    they did not price the solve, and so do the report and the terminal summary."""
    from r2ray.batch import route_config
    from r2ray.batch.job import correction_record
    from r2ray.batch.report import correction_lines

    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)
    correction = fit_correction(rec)

    def record(strict: bool) -> dict:
        return correction_record(correction, route_config(
            input="in", output="out", model="m", budget_usd=1.0, strict_budget=strict))

    strict, planned = record(True), record(False)
    assert strict["applied"] and strict["priced_solve"] is False
    assert planned["applied"] and planned["priced_solve"] is True
    [line] = correction_lines(strict)
    assert "worst case" in line and "c_hat_usd only" in line
    [plain] = correction_lines(planned)
    assert line.startswith(plain) and "worst case" not in plain


# ---- inputs that were silently dropped or crashed, and the correction chain (a review, 2026-12-05)
GOOD_ROW = {"query_id": "q1", "model": "small", "budget": 100, "input_tokens": 10,
            "output_tokens": 40, "quality": 1.0, "cost_usd": 0.5}


def _review_routed(rows):  # (query_id, model, budget, max_tokens, q̂, ĉ)
    c = list(zip(*rows))
    return pa.table({"query_id": pa.array(c[0], pa.string()), "model": pa.array(c[1], pa.string()),
                     "budget": pa.array(c[2], pa.int32()), "max_tokens": pa.array(c[3], pa.int64()),
                     "q_hat": pa.array(c[4], pa.float32()),
                     "t_hat": pa.array([1.0] * len(rows), pa.float32()),
                     "c_hat_usd": pa.array(c[5], pa.float64())})


def _review_manifest(catalog, run_id="night", routed_uri="(unused)", **extra):
    return {"run_id": run_id, "catalog_fingerprint": catalog.fingerprint,
            "spend": {"budget_usd": 10.0}, "counts": {"routed": 1},
            "model": {"uri": "/models/m", "name": "/models/m", "version": "local"},
            "output": {"routed": routed_uri}, "config": {}, "mlflow_run_id": None} | extra

# ---- a cost_usd / quality that is not a number was silently treated as absent ----------------
@pytest.mark.parametrize("field, value", [("cost_usd", "abc"), ("cost_usd", float("nan")),
                                          ("quality", "high"), ("quality", float("nan"))])
def test_unparseable_cost_or_quality_is_marked_not_silently_dropped(tmp_path, field, value):
    # before the fix: invalid is None; cost_usd "abc"/NaN became null, so the row was silently
    # re-priced from the catalogue (a billed amount thrown away); quality "high"/NaN -> "not judged"
    path = tmp_path / "usage.jsonl"
    bad = dict(GOOD_ROW, query_id="q2", **{field: value})
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps(bad) + "\n")
    table = read_actuals(str(path))
    assert table.column("invalid").to_pylist()[0] is None
    reason = table.column("invalid").to_pylist()[1]
    assert reason is not None and field in reason


def test_nan_cost_in_parquet_is_marked(tmp_path):
    # before the fix: a NaN cost_usd in a float column was read as null and priced instead
    path = str(tmp_path / "usage.parquet")
    bad = dict(GOOD_ROW, query_id="q2", cost_usd=float("nan"))
    write_table(pa.Table.from_pylist([GOOD_ROW, bad]), path)
    assert read_actuals(path).column("invalid").to_pylist() == [
        None, "cost_usd given but not a number"]


# ---- a date-like query_id in jsonl was rewritten by Arrow's timestamp inference --------------
def test_date_like_query_id_survives_a_jsonl_read(tmp_path):
    # before the fix: query_id "2024-01-01" came back as "2024-01-01 00:00:00": the actual never
    # matches its routed row and is counted as "of no routed row" with no reason given
    path = tmp_path / "usage.jsonl"
    path.write_text(json.dumps(dict(GOOD_ROW, query_id="2024-01-01")) + "\n")
    assert read_actuals(str(path)).column("query_id").to_pylist() == ["2024-01-01"]
    catalog = _catalog()
    routed = _review_routed([("2024-01-01", "small", 100, 110, .5, 1e-4)])
    rec = reconcile(_review_manifest(catalog), routed,
                    read_actuals(str(path)), catalog)
    assert rec.counts["matched"] == 1


# ---- a deeply nested jsonl line crashed the read --------------------------------------------
def test_deeply_nested_line_is_a_bad_row_not_a_crash(tmp_path):
    # before the fix: RecursionError escaping read_actuals (bench/io.py _read_jsonl json.loads)
    path = tmp_path / "usage.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + "[" * 100_000 + "\n")
    table = read_actuals(str(path))
    assert table.column("invalid").to_pylist() == [None, "not a JSON object"]


# ---- a correction fitted on an already-corrected run was applied to uncorrected ĉ -------------
def _write_run(out, run_id, catalog, rows, correction=None):
    run = out / run_id
    routed = run / "attempt-1" / "routed"
    write_table(_review_routed(rows), str(routed / "model=small" / "part-0.parquet"))
    record = ({"applied": False, "reason": "no reconciliation for this model yet"}
              if correction is None else
              {"applied": True, "version": correction.version,
               "source_run_id": correction.source_run_id, "rows": correction.rows,
               "overall": correction.overall, "created_at": correction.created_at})
    manifest = _review_manifest(catalog, run_id, str(routed), counts={"routed": len(rows)})
    manifest["spend"] = {"budget_usd": 10.0, "cost_correction": record}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return str(run)


def test_a_second_reconciliation_keeps_the_correction_it_was_routed_with(tmp_path):
    # before the fix: night1 (ĉ 1e-3, bill 2e-3) -> factor ≈ 1.98; night2 routed with ĉ × 1.98,
    # billed 2e-3 again -> the new correction ≈ 1.01, which the next run multiplies into the
    # *uncorrected* ĉ: planned 1.01e-3 per row against a 2e-3 bill (the correction oscillates)
    catalog, n, raw, bill = _catalog(), 1000, 1e-3, 2e-3
    catalog_path = str(tmp_path / "catalog.yaml")
    save_catalog(catalog, catalog_path)
    out = tmp_path / "out"

    def actuals(run_id):
        path = tmp_path / f"{run_id}.jsonl"
        path.write_text("".join(json.dumps(dict(GOOD_ROW, query_id=f"q{i}", cost_usd=bill)) + "\n"
                                for i in range(n)))
        return str(path)

    run1 = _write_run(out, "night1", catalog, [(f"q{i}", "small", 100, 110, .5, raw)
                                               for i in range(n)])
    first = reconcile_run(run1, actuals("night1"), catalog_path).correction
    f1 = first.factors_for(catalog)[catalog.arm_of("small", 100)]
    assert f1 == pytest.approx(2.0, rel=0.02)
    run2 = _write_run(out, "night2", catalog, [(f"q{i}", "small", 100, 110, .5, raw * f1)
                                               for i in range(n)], correction=first)
    reconcile_run(run2, actuals("night2"), catalog_path)
    newest = latest_correction(str(out), "/models/m", catalog.fingerprint, None)
    f2 = newest.factors_for(catalog)[catalog.arm_of("small", 100)]
    assert raw * f2 == pytest.approx(bill, rel=0.02)


def test_a_model_the_correction_priced_out_of_the_night_keeps_its_factor(tmp_path):
    # before the fix: night1 bills "large" 3x its ĉ -> factor ≈ 3; night2, priced with it, routes
    # nothing to "large"; its correction had no "large" entry, so the night after priced "large"
    # at factor 1.0, a third of its bill, and would route to it again
    catalog, n = _catalog(), 1000
    catalog_path = str(tmp_path / "catalog.yaml")
    save_catalog(catalog, catalog_path)
    out = tmp_path / "out"

    def billed(run_id, rows):   # (query_id, model, budget, max_tokens, q̂, ĉ) → bill per model
        path = tmp_path / f"{run_id}.jsonl"
        path.write_text("".join(json.dumps(dict(GOOD_ROW, query_id=q, model=m, budget=b,
                                                cost_usd=c * {"small": 1.0, "large": 3.0}[m]))
                                + "\n" for q, m, b, _, _, c in rows))
        return str(path)

    night1 = [(f"s{i}", "small", 100, 110, .5, 1e-4) for i in range(n)] \
        + [(f"l{i}", "large", 100, 110, .5, 1e-3) for i in range(n)]
    first = reconcile_run(_write_run(out, "night1", catalog, night1), billed("night1", night1),
                          catalog_path).correction
    large, small = catalog.arm_of("large", 100), catalog.arm_of("small", 100)
    f1 = first.factors_for(catalog)
    assert f1[large] == pytest.approx(3.0, rel=0.02)
    night2 = [(f"s{i}", "small", 100, 110, .5, 1e-4 * f1[small]) for i in range(n)]
    reconcile_run(_write_run(out, "night2", catalog, night2, correction=first),
                  billed("night2", night2), catalog_path)
    newest = latest_correction(str(out), "/models/m", catalog.fingerprint, None)
    assert newest.source_run_id == "night2"
    f2, large_default = newest.factors_for(catalog), catalog.arm_of("large", 0)
    assert f2[[large, large_default]] == pytest.approx(f1[[large, large_default]])  # before: 1.0
    assert f2[small] == pytest.approx(1.0, rel=0.01)     # refitted on night2's own rows


@pytest.mark.parametrize("field, value, match", [
    ("factor_range", [4.0, 0.25], "factor_range"), ("factor_range", [0.25], "factor_range"),
    ("factor_range", [-1, 4], "factor_range"), ("prior_rows", -5, "prior_rows"),
    ("prior_rows", "nan", "prior_rows"), ("overall", 1000.0, "overall: factor 1000 is outside"),
    ("rows", -3, "rows -3")])
def test_a_hand_edited_correction_is_refused_naming_the_field(field, value, match):
    # before the fix: each was read, and a factor of 1000 priced the next night's arms 1000×
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)
    document = json.loads(fit_correction(rec).to_json())
    with pytest.raises(CorrectionError, match=match):
        CostCorrection.from_json(json.dumps({**document, field: value}), "c.json")
    arm = {**document["arms"][0], "factor": 9.0}
    with pytest.raises(CorrectionError, match=r"arms\[0\] .* factor 9 is outside"):
        CostCorrection.from_json(json.dumps({**document, "arms": [arm]}), "c.json")


# ---- a review, 2026-12-06: money billed outside the routed rows, decimal billing exports ---------
def test_money_billed_to_actuals_of_no_routed_row_is_reported():
    # before the fix: a deferred query run anyway (q7, $5 billed, 500× the budget) was only a row
    # count ("usable actuals of no routed row: 2"); its $5 was in no money figure of the report
    deferred_run_anyway = {"query_id": "q7", "model": "large", "budget": 0, "input_tokens": 1000,
                           "output_tokens": 2000, "quality": None, "cost_usd": 5.0}
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(), actuals_from_table(
        pa.Table.from_pylist(GOOD_ACTUALS + [deferred_run_anyway]), "mem"), catalog)
    priced_q9 = 1 * P_IN["small"] + 1 * P_OUT["small"]   # no cost_usd: priced at its arm
    assert rec.counts["actuals_not_routed"] == 2
    assert rec.overall["not_routed_usd"] == pytest.approx(5.0 + priced_q9, rel=1e-12)
    assert rec.overall["realised_usd"] < 0.01   # the matched rows' figure is unchanged
    report = report_markdown(rec, fit_correction(rec))
    assert "| billed to usable actuals of no routed row (not in realised) | $5 | 500.000 |" \
        in report


def test_a_decimal_cost_column_is_read_as_usd(tmp_path):
    # before the fix: ActualsError "column 'cost_usd' is decimal128(18, 10), not a number": a
    # warehouse billing export (USD as DECIMAL) could not be reconciled at all
    path = str(tmp_path / "usage.parquet")
    rows = [dict(GOOD_ROW, cost_usd=None), dict(GOOD_ROW, query_id="q2")]
    table = pa.Table.from_pylist(rows).set_column(
        6, "cost_usd", pa.array([None, decimal.Decimal("0.0000900000")], pa.decimal128(18, 10)))
    write_table(table, path)
    actuals = read_actuals(path)
    assert actuals.column("invalid").to_pylist() == [None, None]
    assert actuals.column("cost_usd").to_pylist() == [None, pytest.approx(9e-5, rel=1e-12)]


def test_a_local_models_correction_is_found_however_its_folder_is_spelled(tmp_path, monkeypatch):
    """A local model is labelled by its folder: before, as typed, so a run given ``models/m/``,
    ``./models/m`` or ``~/...`` missed the correction reconciled for ``<abs>/models/m``
    ("no reconciliation for this model yet") and planned on uncorrected ĉ."""
    from r2ray.batch.job import LoadedModel
    from r2ray.storage import canonical_uri

    catalog = _catalog()
    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    manifest = _manifest(catalog)
    manifest["model"] |= {"uri": "models/m/", "label": canonical_uri(str(folder))}
    rec = reconcile(manifest, _routed(),
                    actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem"), catalog)
    assert rec.model_label == str(folder.resolve())
    correction = fit_correction(rec, now=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc))
    where = tmp_path / "out" / "night" / "reconcile" / correction.version
    where.mkdir(parents=True)
    (where / "correction.json").write_text(correction.to_json())
    (tmp_path / "out" / "night" / "manifest.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for typed in ("models/m", "models/m/", "./models/m", "models/../models/m", "~/models/m",
                  str(folder) + "/", f"file://{folder}"):
        model = LoadedModel({}, catalog, 4, False, typed, typed, "local")
        found = latest_correction(str(tmp_path / "out"), model.label, catalog.fingerprint,
                                  model.fingerprint)
        assert found == correction, typed
    assert _manifest(catalog)["model"].get("label") is None   # runs committed before the label:
    assert model_label(_manifest(catalog)) == "/models/m"     # the URI as it was typed


# ---- a review, 2026-12-06: which predictor a local model's correction was fitted on -------------
def _commit_correction(out, run: str, document: dict) -> None:
    """``document`` (a correction's JSON) under a committed run ``run`` of output ``out``."""
    folder = out / run / "reconcile" / document["version"]
    folder.mkdir(parents=True)
    (folder / "correction.json").write_text(json.dumps(document))
    (out / run / "manifest.json").write_text("{}")


def test_a_model_retrained_into_its_folder_does_not_take_the_old_ones_correction(tmp_path,
                                                                                caplog):
    """Before the fix a correction was matched by the folder's label and the catalogue only: a
    predictor retrained into the same folder (other settings, other weights) was priced, in the
    batch job and in Serve, with the factors fitted on the previous predictor's actuals."""
    import logging

    from predictor_world import planted_arrays, small_catalog

    from r2ray.batch import route_config
    from r2ray.batch.job import find_correction, load_model
    from r2ray.predictor import make_predictor, save_predictor
    from r2ray.serving.router import load_routing_model

    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=200, dim=8, seed=0)
    folder, out = str(tmp_path / "models" / "m"), tmp_path / "out"
    save_predictor(make_predictor("per_arm_ridge").fit(train, catalog), folder)
    model = load_model(folder, None, None)
    manifest = _manifest(catalog)
    manifest["model"] |= {"uri": folder, "label": model.label, "fingerprint": model.fingerprint}
    routed = _routed([("q1", "model-0", 100, 110, 0.5, 1e-4), ("q2", "model-1", 0, 400, 0.5, 2e-4)])
    actuals = actuals_from_table(pa.Table.from_pylist([
        {"query_id": "q1", "model": "model-0", "budget": 100, "input_tokens": 1,
         "output_tokens": 1, "cost_usd": 3e-4},
        {"query_id": "q2", "model": "model-1", "budget": 0, "input_tokens": 1,
         "output_tokens": 1, "cost_usd": 6e-4}]), "mem")
    correction = fit_correction(reconcile(manifest, routed, actuals, catalog),
                                now=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc))
    assert correction.model_fingerprint == model.fingerprint is not None
    assert CostCorrection.from_json(correction.to_json()) == correction
    _commit_correction(out, "night1", json.loads(correction.to_json()))
    config = route_config(input="in", output=str(out), model=folder, budget_usd=1.0)

    def found() -> tuple:   # (batch job's correction, Serve's correction version)
        batch = find_correction(config, load_model(folder, None, None))
        served = load_routing_model(folder, device="cpu", corrections=str(out)).correction
        return batch and batch.version, served

    assert found() == (correction.version, correction.version)          # the predictor it was for
    save_predictor(make_predictor("per_arm_ridge", alpha=50.0).fit(train, catalog), folder)
    assert found() == (None, None)                                        # retrained in place

    # a correction fitted before fingerprints were recorded cannot tell: not taken, and said so
    older = json.loads(dataclasses.replace(
        correction, created_at="2026-11-02T00:00:00.000000+00:00").to_json())
    del older["model_fingerprint"]
    _commit_correction(out, "night2", older | {"version": "20261102T000000Z-00000000"})
    with caplog.at_level(logging.WARNING, logger="r2ray.reconcile.correction"):
        assert found() == (None, None)
    assert "fitted before r2ray recorded which predictor a run used" in caplog.text


# ---- review s22/H ------------------------------------------------------------------------------
def test_a_correction_of_a_run_without_a_predictor_fingerprint_says_it_is_not_applied():
    # before the fix the report said the next run "picks up" the correction, though
    # latest_correction skips one that records no predictor (fitted_on, with a warning)
    from r2ray.reconcile.run import ReconcileResult

    catalog = _catalog()
    actuals = actuals_from_table(pa.Table.from_pylist(GOOD_ACTUALS), "mem")
    written = {"folder": "/out/night/reconcile/v", "mlflow_run_id": None}
    older_run = reconcile(_manifest(catalog), _routed(), actuals, catalog)   # no model.fingerprint
    correction = fit_correction(older_run)
    assert correction.model_fingerprint is None
    report = report_markdown(older_run, correction)
    assert "pick up the newest correction" not in report
    assert "**Not applied to later runs.** Run `night` was committed before r2ray recorded" in report
    assert "not applied to later runs" in ReconcileResult(older_run, correction, written).summary()

    manifest = _manifest(catalog)
    manifest["model"] |= {"fingerprint": "ab" * 32}
    newer_run = reconcile(manifest, _routed(), actuals, catalog)
    correction = fit_correction(newer_run)
    report = report_markdown(newer_run, correction)
    assert f"(predictor `{'ab' * 6}…`, not another saved under it) on this catalogue pick up" \
        in report and "Not applied" not in report
    assert "not applied" not in ReconcileResult(newer_run, correction, written).summary()


# ---- a review, 2026-12-06 (S): bills repeated, bad rows located ---------------------------------
def test_money_billed_again_to_a_repeated_key_is_reported(tmp_path):
    # before the fix: a retried call billed twice (q4 again, $5, in a second file of the bill
    # folder) and a repeated q1 priced at its arm were only a count of "duplicate" rows; the
    # money they billed was in no money figure of the report
    folder = tmp_path / "bills"
    folder.mkdir()
    _write_actuals(GOOD_ACTUALS, folder / "a.jsonl")
    _write_actuals([dict(GOOD_ACTUALS[3], cost_usd=5.0), GOOD_ACTUALS[0]], folder / "b.parquet")
    catalog = _catalog()
    rec = reconcile(_manifest(catalog), _routed(), read_actuals(str(folder)), catalog)
    priced_q1 = 10 * P_IN["small"] + 40 * P_OUT["small"]
    assert rec.invalid == {"duplicate (query_id, model, budget)": 2}
    assert rec.overall["duplicate_usd"] == pytest.approx(5.0 + priced_q1, rel=1e-12)
    assert rec.overall["realised_usd"] < 0.01   # the first bill of each key is the realised one
    report = report_markdown(rec, fit_correction(rec))
    assert "| billed again to a repeated (query_id, model, budget) (not in realised) | " \
        "$5.00009 | 500.009 |" in report


def test_a_bad_jsonl_row_is_named_by_its_line_and_lines_split_as_every_jsonl_reader_does(
        tmp_path):
    # before the fix: "row N" counted the rows, not the lines (after a blank line it named the
    # wrong line); and where a row made the file fall back to one line at a time (a budget of
    # "default" beside numbers) a byte order mark spoiled the first row and a U+2028 inside a
    # query id (valid JSON) split that row into two bad ones
    good, default = GOOD_ACTUALS[0], dict(GOOD_ACTUALS[1], budget="default")
    too_good = json.dumps(dict(GOOD_ACTUALS[2], quality=7))
    fast = tmp_path / "fast.jsonl"
    fast.write_text(f"{json.dumps(good)}\n\n\n{too_good}\n")
    lenient = tmp_path / "lenient.jsonl"
    lenient.write_bytes(b"\xef\xbb\xbf" + "\n".join([
        json.dumps(good), "", json.dumps(dict(GOOD_ACTUALS[3], query_id="q\u20284"),
                                         ensure_ascii=False),
        json.dumps(default), "not json", too_good]).encode() + b"\n")
    fast_rows, lenient_rows = read_actuals(str(fast)), read_actuals(str(lenient))
    assert fast_rows.column("row").to_pylist() == [1, 4]
    assert fast_rows.column("invalid").to_pylist() == [None, "quality outside [0, 1]"]
    assert lenient_rows.column("row").to_pylist() == [1, 3, 4, 5, 6]
    assert lenient_rows.column("query_id").to_pylist()[:3] == ["q1", "q\u20284", "q2"]
    assert lenient_rows.column("invalid").to_pylist() == [
        None, None, None, "not a JSON object", "quality outside [0, 1]"]


def test_a_few_rows_confirming_the_factor_a_night_was_priced_with_keep_it():
    # before the fix: night1 bills "large" 3x its ĉ on 1000 rows -> factor ≈ 3; night2, priced
    # with it, routes one row to "large", billed 3x again; that row was shrunk toward the
    # *fresh* model factor (itself one row shrunk toward ~1.0), so the night after priced
    # "large" at 1.2, 40% of its bill, while with no row at all it kept 3.0
    catalog = _catalog()
    large, small = catalog.arm_of("large", 100), catalog.arm_of("small", 100)
    routed, actuals = _scaled_run({("small", 100): (1000, 1e-4, 1e-4),
                                   ("large", 100): (1000, 1e-3, 3e-3)})
    first = fit_correction(reconcile(_manifest(catalog), routed, actuals, catalog))
    f1 = first.factors_for(catalog)
    assert f1[large] == pytest.approx(3.0, rel=1e-3)
    for rows in (1, 5):
        routed, actuals = _scaled_run({("small", 100): (1000, 1e-4 * f1[small], 1e-4),
                                       ("large", 100): (rows, 1e-3 * f1[large], 3e-3)})
        rec = reconcile(_manifest(catalog), routed, actuals, catalog, f1)
        f2 = fit_correction(rec, priced_with=first).factors_for(catalog)
        assert f2[large] == pytest.approx(3.0, rel=1e-3)     # before: 1.20 (1 row), 1.78 (5)
        assert f2[small] == pytest.approx(1.0, rel=1e-3)


# ---- another night's bills (the same query ids and arms) were joined as this run's ----------
def test_rows_billed_to_another_run_are_invalid_naming_both_runs(tmp_path):
    """Nightly backlogs reuse query ids: a file holding last night's bills beside tonight's
    matched both and the older ones counted as repeats of the key; each is marked with both
    ids (a date-like run id in jsonl stays text) and only the run's own bills are realised."""
    catalog = _catalog()
    own = [dict(r, run_id="night") for r in GOOD_ACTUALS[:4]]
    other = [dict(r, run_id="2026-12-05", cost_usd=1.0) for r in GOOD_ACTUALS[:4]]
    path = _write_actuals(other + own, tmp_path / "usage.jsonl")
    rec = reconcile(_manifest(catalog), _routed(), read_actuals(path), catalog)
    assert rec.invalid == {"billed to run '2026-12-05', not run 'night'": 4}
    assert rec.invalid_first["billed to run '2026-12-05', not run 'night'"] == f"{path} row 1"
    assert rec.counts["matched"] == 4 and rec.counts["actuals_run_unchecked"] == 0
    assert rec.overall["realised_usd"] == pytest.approx(9e-5 + 3e-4 + 1.6e-3 + 1e-3)
    assert rec.overall["duplicate_usd"] == 0.0


def test_actuals_without_a_run_id_are_reconciled_and_said_unchecked(tmp_path, capsys):
    run, catalog_path = _hand_built_run(tmp_path)
    export = _write_actuals(GOOD_ACTUALS, tmp_path / "usage.jsonl")   # a provider's export
    assert main(["reconcile", "--run", run, "--actuals", export, "--catalog",
                 catalog_path]) == 0
    note = ("5 name no run_id: whether they are run night's bills could not be checked")
    assert note in capsys.readouterr().out
    [version] = os.listdir(os.path.join(run, "reconcile"))
    assert note in open(os.path.join(run, "reconcile", version, "report.md")).read()


def test_actuals_of_which_no_row_is_the_runs_are_refused(tmp_path, capsys):
    run, catalog_path = _hand_built_run(tmp_path)
    other = _write_actuals([dict(r, run_id="night0") for r in GOOD_ACTUALS],
                           tmp_path / "usage.parquet")
    assert main(["reconcile", "--run", run, "--actuals", other, "--catalog",
                 catalog_path]) == EXIT_USER_ERROR
    assert ("none of the 5 rows is of run 'night'; they name run(s) ['night0']"
            in capsys.readouterr().err)
    assert not os.path.exists(os.path.join(run, "reconcile"))


# ---- review s27/GI: money printed with its cents ------------------------------------------------
def test_the_report_and_summary_keep_the_cents_of_large_sums():
    # before the fix: ``.6g`` printed a $12,345.67 budget as $12345.7 and ``.4g`` an arm's
    # $1,234.56 realised as $1235, in report.md and in the terminal summary
    from r2ray.reconcile.run import ReconcileResult

    catalog = _catalog()
    billed = [dict(row) for row in GOOD_ACTUALS]
    billed[3]["cost_usd"] = 1234.56   # q4 (large @ 100) billed $1,234.56
    manifest = _manifest(catalog)
    manifest["spend"]["budget_usd"] = 12345.67
    rec = reconcile(manifest, _routed(), actuals_from_table(pa.Table.from_pylist(billed), "mem"),
                    catalog)
    correction = fit_correction(rec)
    report = report_markdown(rec, correction)
    assert "| budget | $12345.67 | 1.000 |" in report
    assert "| large | 100 | 2 | 2 | 0.003 | 1234.56 |" in report
    summary = ReconcileResult(rec, correction, {"folder": "/o", "mlflow_run_id": None}).summary()
    assert "budget $12345.67:" in summary and "large @ 100: $1234.56 vs $0.003 " in summary
