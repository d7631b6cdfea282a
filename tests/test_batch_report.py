"""The batch run's report.md, spend plot and MLflow run, on hand-made stats (no Ray)."""

import io

import mlflow
import pyarrow as pa
from PIL import Image

from r2ray.batch.report import STATS_SCHEMA, combine_stats, log_to_mlflow, report_markdown, \
    spend_plot_png


def _stats(models: list[str], spend_usd: float = 1e-5) -> pa.Table:
    return combine_stats(pa.Table.from_pylist(
        [{"model": m, "budget": 0, "queries": 3, "spend_usd": spend_usd,
          "worst_case_usd": 2 * spend_usd, "quality_sum": 1.5, "tokens_sum": 30.0} for m in models],
        schema=STATS_SCHEMA))


def _manifest(routed: int, deferred: int, predicted_usd: float) -> dict:
    return {"run_id": "nightly", "committed_at": "2026-01-01T00:00:00+00:00",
            "model": {"uri": "/models/m", "version": "local"}, "input": {"uri": "/in"},
            "config": {}, "catalog_fingerprint": "0" * 64,
            "counts": {"rows_in": routed + deferred, "routed": routed, "quarantined": 0,
                       "duplicates": 0, "deferred": deferred, "unreadable_files": 0},
            "spend": {"budget_usd": 1e-3, "usable_usd": 1e-3, "predicted_usd": predicted_usd,
                      "worst_case_usd": 2 * predicted_usd},
            "solve": {"lambda": 1.0, "theta": 0.5, "gap": 0.0, "objective": 1.5},
            "timings": {"solve": 0.1}}


def test_the_spend_plot_draws_model_names_as_text():
    """Catalogue names are data: before the fix a name with two ``$`` was parsed as mathtext,
    and ``a$$b`` or ``pay$_$go`` raised ValueError after the solve, so the run never committed."""
    names = ["a$$b", "pay$_$go", "cost$5$", "acme/mini=v2"]
    image = Image.open(io.BytesIO(spend_plot_png(_stats(names))))
    assert image.format == "PNG" and image.size[0] > 0


def test_the_report_table_keeps_odd_names_in_their_cell_and_small_spends_readable():
    """A ``|`` in a model name ended its cell (the spend landed under "budget"), and a group's
    spend below half a micro-dollar showed as 0.000000 though the header read $3e-07."""
    report = report_markdown(_manifest(3, 0, 3e-7), _stats(["x|y"], spend_usd=3e-7))
    row = next(line for line in report.splitlines() if line.startswith("| x"))
    assert row.startswith(r"| x\|y | default | 3 | 3e-07 | 6e-07 |")
    assert row.replace(r"\|", "").count("|") == 8   # seven cells


def test_the_report_and_mlflow_count_the_deferred_rows(tmp_path, mlflow_store):
    """All five queries deferred: the report said "queries in: 5 · routed: 0 · quarantined: 0"
    and the MLflow run had no count for the other five."""
    manifest, stats = _manifest(0, 5, 0.0), STATS_SCHEMA.empty_table()
    assert "queries in: 5 · routed: 0 · deferred: 5 · quarantined: 0" in report_markdown(
        manifest, stats)
    uri, before = mlflow_store(tmp_path), (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    try:
        run_id = log_to_mlflow(manifest, stats, uri)
    finally:   # log_to_mlflow points MLflow at this store process-wide
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics["deferred"] == 5


def test_a_plot_that_cannot_be_drawn_costs_the_picture_not_the_run(tmp_path, mlflow_store,
                                                                    monkeypatch, capsys):
    """The plot pictures figures report.md and the manifest already hold: a matplotlib failure
    (any, not only a name read as mathtext) used to fail the run after its solve, uncommitted."""
    import matplotlib.figure

    from r2ray.batch import report as batch_report

    def broken(*args, **kwargs):
        raise RuntimeError("no renderer")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    manifest, stats = _manifest(3, 0, 3e-5), _stats(["m"])
    assert batch_report.spend_plot_or_none(stats) is None
    assert "spend plot could not be drawn (RuntimeError: no renderer)" in capsys.readouterr().err
    artifacts = batch_report.write_report(str(tmp_path / "run"), manifest, stats, None)
    assert artifacts == {"report": str(tmp_path / "run" / "report.md")}
    assert "predicted spend: $3e-05" in (tmp_path / "run" / "report.md").read_text()
    uri, before = mlflow_store(tmp_path), (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    try:
        run_id = log_to_mlflow(manifest, stats, uri)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics["routed"] == 3


def _read_cell(cell: str) -> str:
    """The text a CommonMark reader shows for ``cell``, failing on any special character it
    would act on (one not escaped with a backslash)."""
    shown, chars = [], iter(cell)
    for char in chars:
        if char == "\\":
            shown.append(next(chars))
        else:
            assert char not in "`*_[]<>|~&$", (cell, char)
            shown.append(char)
    return "".join(shown)


def test_the_report_table_shows_model_names_as_written():
    """``*``, ``_``, backticks, ``<``, ``[``, ``&``, ``~``, ``$`` in a model name formatted in
    report.md (``*fast*`` in italics, ``<img src=x>`` as HTML): only ``|`` and ``\\`` were
    escaped."""
    names = ["*fast*", "_v2_", "a`b`c", "<img src=x>", "[x](u)", "m&amp;", "~~old~~", "$5$",
             r"a\*b", "x|y", "gpt-4o.mini"]
    report = report_markdown(_manifest(3, 0, 1e-5), _stats(names))
    cells = [line.split(" | ")[0].removeprefix("| ") for line in report.splitlines()
             if line.startswith("| ") and " | default | " in line]
    assert sorted(_read_cell(cell) for cell in cells) == sorted(names)
    assert r"| \*fast\* | default |" in report and "| gpt-4o.mini | default |" in report


def _guaranteed(probability: float, objective: float, gap: float = 1e-4) -> dict:
    """A manifest of a run planned under ``probability``'s spend guarantee whose solve kept
    Σ q̂ = ``objective`` (0: every row deferred), with the record the job writes."""
    from types import SimpleNamespace

    from r2ray.batch.job import guarantee_record
    from r2ray.predictor.spend_guarantee import SpendPlan

    plan = SpendPlan(budget_usd=1e-3, planned_limit_usd=9e-4, inflation=1e-3 / 9e-4,
                     probability=probability, expected_ratio=1.01, method="simulated",
                     position=0.5)
    certificate = SimpleNamespace(gap=gap, lam=0.1, objective=objective)
    manifest = _manifest(3, 0, 8e-4)
    manifest["spend"]["guarantee"] = guarantee_record(plan, certificate, 8e-4)
    manifest["solve"] |= {"objective": objective, "upper_bound": objective + gap}
    manifest["output"] = {"routed": "/out/nightly/attempt-1/routed"}
    manifest["spend"]["by_model"] = {}
    return manifest


def test_a_guarantee_is_never_rounded_past_what_it_promises():
    """p = 0.995 read "probability ≥ 100%" (the strict budget's certainty), and a share of the
    objective given up of 0.004% read "≤ 0.00%": a bound rounded to the nearest is no bound."""
    from r2ray.batch.job import summarise_manifest

    manifest = _guaranteed(0.995, objective=2.0, gap=0.0)   # given up: 0.1 × 1e-4 = 1e-5 Σ q̂
    report, summary = report_markdown(manifest, _stats(["m"])), summarise_manifest(manifest)
    assert "with probability ≥ 99.5%," in report and "with p ≥ 99.5%:" in summary
    assert "(0.01% of the objective; dual bound)" in report
    assert "quality given up ≤ 0.01%" in summary


def test_a_run_that_kept_no_quality_reports_no_share_of_it():
    """Every row deferred: the objective is 0, and the quality given up was divided by 1e-300
    into a share of 1e296, shown as a 300-digit percentage in report.md and the summary."""
    from r2ray.batch.job import summarise_manifest

    manifest = _guaranteed(0.9, objective=0.0)
    assert manifest["spend"]["guarantee"]["quality_given_up_share_at_most"] is None
    report, summary = report_markdown(manifest, STATS_SCHEMA.empty_table()), \
        summarise_manifest(manifest)
    assert "at most 0.00011 Σ q̂ (dual bound)" in report
    assert "quality given up" not in summary and "%)" not in summary


def test_a_run_without_a_guarantee_records_strict_json():
    """``--spend-guarantee 0``: the plan's expected ratio is NaN, which manifest.json held as a
    bare ``NaN`` (not JSON: JavaScript's JSON.parse and Go's encoding/json refuse it)."""
    import json

    from r2ray.batch.job import guarantee_record
    from r2ray.predictor.spend_guarantee import plan_budget

    record = guarantee_record(plan_budget(1e-3, 3, 0.0, None), None, 8e-4)
    assert record["expected_realised_over_planned"] is None
    json.dumps(record, allow_nan=False)


def test_money_in_the_report_and_summary_keeps_its_cents():
    """Six significant digits read a $12,345.67 budget as $12345.7 and $1,234,567.89 as
    $1.23457e+06, in report.md and on the terminal; tiny per-query sums stay readable."""
    from r2ray.batch.job import summarise_manifest

    manifest = _guaranteed(0.95, objective=1.5)
    manifest["spend"] |= {"budget_usd": 1234567.89, "usable_usd": 12345.67,
                          "predicted_usd": 3e-5, "worst_case_usd": 123456.78}
    manifest["spend"]["guarantee"] |= {"budget_usd": 1234567.89, "planned_limit_usd": 12345.67}
    report = report_markdown(manifest, _stats(["m"], spend_usd=12345.67))
    assert "- budget: $1234567.89 (planned under $12345.67) · predicted spend: $3e-05 · " \
           "worst case at the caps: $123456.78" in report
    assert "realised spend ≤ $1234567.89 with probability ≥ 95%, planning under $12345.67" \
        in report
    assert "| m | default | 3 | 12345.67 | 24691.34 |" in report
    assert "predicted $3e-05 of $12345.67 usable (budget $1234567.89" in \
        summarise_manifest(manifest)


def _logged_metrics(manifest: dict, uri: str) -> dict[str, float]:
    """The metrics of the MLflow run ``log_to_mlflow`` logs for ``manifest`` into store ``uri``."""
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    try:
        run_id = log_to_mlflow(manifest, _stats(["m"]), uri)
    finally:   # log_to_mlflow points MLflow at this store process-wide
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return mlflow.MlflowClient(uri).get_run(run_id).data.metrics


def test_the_mlflow_run_logs_every_count_the_report_shows(tmp_path, mlflow_store):
    """report.md shows duplicates' rows, unreadable files and the rows left unread in them; the
    MLflow run logged only rows_in, routed, deferred and quarantined."""
    manifest = _manifest(3, 0, 3e-5)
    manifest["counts"] |= {"duplicates": 2, "unreadable_files": 1, "unread_rows": 7}
    metrics = _logged_metrics(manifest, mlflow_store(tmp_path))
    assert {name: metrics[name] for name in manifest["counts"]} == manifest["counts"]


def test_a_count_the_run_could_not_know_is_left_out_of_the_mlflow_metrics(tmp_path, mlflow_store):
    """``rows_planned`` is None when a jsonl file is in the input (its rows are counted only as
    read): logged as a metric, MLflow refused the run's every metric."""
    manifest = _manifest(3, 0, 3e-5)
    manifest["counts"] |= {"rows_planned": None}
    metrics = _logged_metrics(manifest, mlflow_store(tmp_path))
    assert "rows_planned" not in metrics and metrics["routed"] == 3


def test_a_night_that_does_not_commit_leaves_its_mlflow_run_failed(tmp_path, mlflow_store):
    """The lease lost between the MLflow run and the commit: the run stayed FINISHED, showing
    the counts and spend of a night no manifest committed."""
    import threading

    import pytest

    from r2ray.batch.config import route_config
    from r2ray.batch.job import _report_and_commit
    from r2ray.lease import LeaseLost
    from r2ray.manifest import RunPaths, is_committed

    class LostAtTheCommit:   # renewed before the report, taken over before the commit
        renewals = 0

        def renew(self) -> None:
            self.renewals += 1
            if self.renewals == 2:
                raise LeaseLost("another run took the lease over")

    uri, before = mlflow_store(tmp_path), (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    config = route_config(input="in", output=str(tmp_path / "out"), model="m", budget_usd=1.0,
                          run_id="nightly", tracking_uri=uri)
    paths = RunPaths(config.output, "nightly", "attempt-1")
    warm = threading.Thread(target=lambda: None)
    warm.start()
    try:
        with pytest.raises(LeaseLost):
            _report_and_commit(config, paths, _manifest(3, 0, 3e-5), _stats(["m"]), warm, {},
                               LostAtTheCommit())
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert not is_committed(paths)
    (run,) = mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()])
    assert run.info.status == "FAILED"
    assert run.data.tags["r2ray.not_committed"] == "LeaseLost: another run took the lease over"


def test_each_stage_says_on_stderr_when_it_starts_and_ends(capsys):
    """Ray Data shows progress for its datasets only: the plan's listing, the solve, the assign
    and write and the report ran for minutes on a large night without a line on the terminal."""
    from r2ray.batch.job import _timed

    timings = {}
    with _timed(timings, "solve_assign_write"):
        assert capsys.readouterr().err == "r2ray: solve_assign_write …\n"
    assert capsys.readouterr().err == \
        f"r2ray: solve_assign_write done in {timings['solve_assign_write']} s\n"
