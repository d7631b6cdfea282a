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
