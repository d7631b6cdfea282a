"""The batch job on the session's local Ray cluster: accounting, budget, crash safety, bad input."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2ray import manifest as runs
from r2ray.bench.io import read_table, write_table
from r2ray.bench.synthetic import synth_backlog
from r2ray.cli import EXIT_NOTHING_ROUTED, main
from r2ray.batch.config import route_config
from r2ray.catalog import Arm
from r2ray.errors import R2RayError
from r2ray.prompting import estimate_tokens, length_suffix
from r2ray.routing import routed_request
from r2ray.failpoints import FAILPOINT_ENV
from r2ray.batch import route_batch

pytestmark = pytest.mark.slow


def _backlog(folder, catalog, n=400, seed=5):
    """Good queries in two parquet files, plus a jsonl of bad rows and a corrupt file."""
    table = synth_backlog(catalog, n, seed=seed, embeddings=True)
    write_table(table.slice(0, n // 2), str(folder / "part-0.parquet"))
    write_table(table.slice(n // 2), str(folder / "part-1.parquet"))
    first = table.slice(0, 1).to_pylist()[0]
    bad = [
        {"query_id": first["query_id"], "query": "a repeat of the first id",
         "embedding": first["embedding"]},                         # duplicate id
        {"query": "no id", "embedding": first["embedding"]},        # missing id
        {"query_id": "blank", "query": "   ", "embedding": first["embedding"]},
        {"query_id": "dim", "query": "short vector", "embedding": [0.5, 0.5]},
        {"query_id": "text-only", "query": "needs an encoder"},      # model has none
    ]
    (folder / "part-2.jsonl").write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    (folder / "part-3.parquet").write_bytes(b"not a parquet file at all")
    return table


def _routed(paths: runs.RunPaths) -> pa.Table:
    return read_table_all(paths.routed)


def read_table_all(uri) -> pa.Table:
    from r2ray import storage
    return pa.concat_tables([read_table(f) for f in storage.list_files(uri, (".parquet",))])


@pytest.fixture(autouse=True)
def _tracking_store(tmp_path, mlflow_store):
    """Each run logs to a fresh MLflow store at tmp_path/mlflow.db, as ``_config`` names it."""
    mlflow_store(tmp_path)


def _config(tmp_path, model, **extra):
    values = dict(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=model["path"],
                  budget_per_query_usd=5e-5, run_id="nightly", workers=1, batch_size=64,
                  tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return route_config(**(values | extra))


def _assert_every_row_routed_or_quarantined_within_budget(tmp_path, table, manifest, paths,
                                                          catalog):
    """The committed run of ``_backlog``'s 400 good rows and its bad ones: every row routed once
    or quarantined with a reason, within budget, every prompt capped, the report written."""
    assert runs.is_committed(paths) and paths.attempt.startswith("attempt-")
    routed = _routed(paths)
    quarantine = read_table_all(paths.quarantine)
    counts = manifest["counts"]
    assert counts == {"rows_in": 405, "routed": 400, "quarantined": 5, "duplicates": 1,
                      "deferred": 0, "unreadable_files": 1, "unread_rows": 0,
                      "rows_planned": None}
    assert routed.num_rows == 400 and len(set(routed.column("query_id").to_pylist())) == 400
    assert set(routed.column("query_id").to_pylist()) == set(table.column("query_id").to_pylist())
    reasons = sorted(r for r in quarantine.column("reason").to_pylist())
    first_file = str(tmp_path / "in" / "part-0.parquet")
    assert any(r.startswith(f"duplicate query_id (first seen in {first_file}, row 1)")
               for r in reasons)
    assert any(r.startswith("unreadable parquet file") for r in reasons)
    assert "missing query_id" in reasons and "empty or whitespace-only query" in reasons
    spend = routed.column("c_hat_usd").to_numpy().sum(dtype=np.float64)
    assert spend <= manifest["spend"]["usable_usd"] + 1e-12
    assert manifest["spend"]["predicted_usd"] == pytest.approx(spend, rel=1e-12)
    assert manifest["spend"]["strict_budget"] is False
    assert manifest["spend"]["worst_case_usd"] > manifest["spend"]["usable_usd"]  # not a bound
    assert manifest["solve"]["lambda"] > 0 and manifest["solve"]["gap"] >= 0
    assert manifest["solve"]["path"] == "in memory"           # a small backlog, solver alive
    # every routed prompt carries the length instruction and a hard cap that matches its budget:
    # each row as Serve renders it (routing.routed_request), from the query and its input tokens
    source = {r["query_id"]: r for r in table.to_pylist()}
    for row in routed.to_pylist():
        content = row["messages"][-1]["content"]
        if row["budget"] > 0:
            assert f"at most {row['budget']} tokens" in content
            assert row["budget"] < row["max_tokens"] <= row["budget"] * 1.1 + 8
        assert row["lambda_star"] == manifest["solve"]["lambda"]
        query = source[row["query_id"]]
        tokens = query.get("input_tokens") or estimate_tokens(query["query"])
        arm = catalog.arm_index[Arm(row["model"], row["budget"])]
        assert {k: row[k] for k in ("model", "budget", "messages", "max_tokens")} == \
            routed_request(query["query"], arm, catalog, tokens)
    for artifact in ("report.md", "spend.png"):
        assert os.path.getsize(paths.path(artifact)) > 0
    assert manifest["mlflow_run_id"]


def test_strict_budget_bounds_the_bill_at_the_caps(tmp_path, ray_local, small_routing_model,
                                                  capsys):
    """--strict-budget: Σ ((input + length instruction) × p_in + max_tokens × p_out) over routed
    rows ≤ the budget, while c_hat_usd stays the predicted cost and the manifest reports both."""
    (tmp_path / "in").mkdir()
    catalog = small_routing_model["catalog"]
    backlog = _backlog(tmp_path / "in", catalog, n=200, seed=8)
    config = _config(tmp_path, small_routing_model, run_id="strict")
    assert main(["route", "--input", config.input, "--output", config.output, "--model",
                 config.model, "--budget-per-query", "5e-5", "--run-id", "strict",
                 "--workers", "1", "--tracking-uri", config.tracking_uri, "--strict-budget"]) == 0
    assert "(strict budget)" in capsys.readouterr().out
    paths = runs.committed_paths(runs.RunPaths(config.output, "strict"))
    manifest, routed = runs.read_manifest(paths), _routed(paths).to_pylist()
    spend = manifest["spend"]
    assert spend["strict_budget"] is True and manifest["config"]["strict_budget"] is True
    assert len(routed) == 200 and spend["usable_usd"] == pytest.approx(200 * 5e-5)
    tokens_in = dict(zip(backlog.column("query_id").to_pylist(),
                         backlog.column("input_tokens").to_pylist()))
    queries = dict(zip(backlog.column("query_id").to_pylist(),
                       backlog.column("query").to_pylist()))
    price = {m.name: (m.input_per_m * 1e-6, m.output_per_m * 1e-6) for m in catalog.models}
    # the prompt sent: the query's tokens plus the length instruction's UTF-8 bytes
    instruction = {r["query_id"]: len(r["messages"][0]["content"].encode())
                   - len(queries[r["query_id"]].encode()) for r in routed}
    worst = [(tokens_in[r["query_id"]] + instruction[r["query_id"]]) * price[r["model"]][0]
             + r["max_tokens"] * price[r["model"]][1] for r in routed]
    # ĉ prices the prompt sent too, with the instruction's estimated tokens (routing.call_cost_usd)
    sent = [tokens_in[r["query_id"]]
            + (estimate_tokens(length_suffix(r["budget"])) if r["budget"] else 0) for r in routed]
    predicted = [tokens * price[r["model"]][0] + r["t_hat"] * price[r["model"]][1]
                 for tokens, r in zip(sent, routed)]
    assert sum(worst) <= spend["usable_usd"] * (1 + 1e-12)
    assert sum(worst) > 0.9 * spend["usable_usd"]        # the guarantee binds, and is used
    assert spend["worst_case_usd"] == pytest.approx(sum(worst), rel=1e-9)
    np.testing.assert_allclose([r["c_hat_usd"] for r in routed], predicted, rtol=1e-12)
    assert spend["predicted_usd"] == pytest.approx(sum(predicted), rel=1e-6)
    assert spend["worst_case_usd"] >= spend["predicted_usd"]
    assert all(r["max_tokens"] <= 4000 for r in routed if r["budget"] == 0)
    assert "strict budget" in open(paths.path("report.md")).read()


def test_crash_redo_and_force_commit_every_row_routed_or_quarantined_within_budget(
        tmp_path, ray_local, small_routing_model, monkeypatch):
    """A run dies just before its commit; the re-run redoes it, on a pool of two actors, and its
    committed output accounts for every row; a committed run id is then a no-op, and --force
    swaps a new attempt in only at its commit."""
    (tmp_path / "in").mkdir()
    table = _backlog(tmp_path / "in", small_routing_model["catalog"])
    crashed = _config(tmp_path, small_routing_model, run_id="crashy")
    monkeypatch.setenv(FAILPOINT_ENV, "before_commit")
    with pytest.raises(RuntimeError, match="failpoint"):
        route_batch(crashed)
    paths = runs.RunPaths(crashed.output, "crashy")
    (left,) = [n for n in os.listdir(paths.root) if n.startswith("attempt-")]
    assert not runs.is_committed(paths)
    first = read_table_all(os.path.join(paths.root, left, "routed"))   # all written, not committed
    monkeypatch.delenv(FAILPOINT_ENV)
    manifest = route_batch(crashed.model_copy(update={"workers": 2}))   # a pool of two actors
    assert manifest["state_before"] == "redo"
    assert not os.path.exists(os.path.join(paths.root, left))   # the crashed attempt is cleared
    paths = runs.committed_paths(paths)
    again = _routed(paths)
    key = lambda t: sorted(zip(t.column("query_id").to_pylist(), t.column("model").to_pylist(),  # noqa: E731
                               t.column("budget").to_pylist()))
    assert key(again) == key(first)
    assert len(set(again.column("query_id").to_pylist())) == again.num_rows  # no duplicates
    _assert_every_row_routed_or_quarantined_within_budget(tmp_path, table, manifest, paths,
                                                          small_routing_model["catalog"])
    # a committed run id is a no-op
    assert route_batch(crashed)["committed_at"] == manifest["committed_at"]
    # a forced run that dies before its commit leaves the committed run whole
    monkeypatch.setenv(FAILPOINT_ENV, "before_commit")
    with pytest.raises(RuntimeError, match="failpoint"):
        route_batch(crashed.model_copy(update={"force": True}))
    assert runs.read_manifest(paths) == manifest and key(_routed(paths)) == key(first)
    # --force redoes it in a new attempt and swaps it in at the commit
    monkeypatch.delenv(FAILPOINT_ENV)
    forced = route_batch(crashed.model_copy(update={"force": True}))
    assert forced["state_before"] == "forced" and forced["attempt"] != manifest["attempt"]
    assert [n for n in os.listdir(paths.root) if n.startswith("attempt-")] == [forced["attempt"]]
    assert key(_routed(runs.committed_paths(paths))) == key(first)


def test_a_backlog_of_only_bad_rows_commits_its_quarantine(tmp_path, ray_local,
                                                           small_routing_model, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "night.parquet").write_bytes(b"corrupt: the only file tonight")
    (tmp_path / "in" / "rows.jsonl").write_text('{"query": "no id"}\n{"query_id": "x"}\n')
    config = _config(tmp_path, small_routing_model, run_id="bad-night")
    args = ["route", "--input", config.input, "--output", config.output, "--model",
            config.model, "--budget-per-query", "5e-5", "--run-id", "bad-night",
            "--tracking-uri", config.tracking_uri]
    assert main(args) == EXIT_NOTHING_ROUTED
    assert "no query could be routed" in capsys.readouterr().out
    manifest = runs.read_manifest(runs.RunPaths(config.output, "bad-night"))
    assert manifest["counts"] == {"rows_in": 2, "routed": 0, "quarantined": 2, "duplicates": 0,
                                  "deferred": 0, "unreadable_files": 1, "unread_rows": 0,
                                  "rows_planned": None}
    assert manifest["solve"] is None
    quarantine = read_table_all(manifest["output"]["quarantine"])
    assert quarantine.num_rows == 3


def test_a_row_lost_between_the_read_and_the_solve_is_caught_before_the_commit(
        tmp_path, ray_local, small_routing_model, monkeypatch):
    """A parquet night (row groups of 50, a repeated id, a corrupt file) commits with the
    footers' count checked; the same night with one row of each read unit lost on the way (as
    a retried read task that did not emit a slice again would) is refused, nothing committed.
    Before, ``rows_in`` was derived from the rows that arrived and the lossy run committed."""
    from r2ray.batch import backlog, job

    (tmp_path / "in").mkdir()
    table = synth_backlog(small_routing_model["catalog"], 200, seed=3, embeddings=True)
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=50)
    write_table(table.slice(0, 2), str(tmp_path / "in" / "b.parquet"))   # two repeated ids
    (tmp_path / "in" / "c.parquet").write_bytes(b"not a parquet file at all")
    manifest = route_batch(_config(tmp_path, small_routing_model, run_id="clean"))
    assert manifest["counts"]["rows_planned"] == 202 and manifest["input"]["rows_check"] == "passed"
    assert (manifest["counts"]["rows_in"], manifest["counts"]["duplicates"]) == (202, 2)

    original = backlog.read_stage

    def lossy_read_stage(batch, **kwargs):
        for index, good in enumerate(original(batch, **kwargs)):
            yield good.slice(1) if index == 0 else good

    monkeypatch.setattr(job, "read_stage", lossy_read_stage)
    lossy = _config(tmp_path, small_routing_model, run_id="lossy")
    with pytest.raises(RuntimeError, match="footers count 202 rows but the run accounts for 197 "):
        route_batch(lossy)
    assert not runs.is_committed(runs.RunPaths(lossy.output, "lossy"))


def test_infeasible_budget_commits_nothing(tmp_path, ray_local, small_routing_model):
    (tmp_path / "in").mkdir()
    _backlog(tmp_path / "in", small_routing_model["catalog"], n=100, seed=9)
    config = _config(tmp_path, small_routing_model, budget_per_query_usd=None,
                     budget_usd=1e-9, run_id="tiny")
    with pytest.raises(R2RayError, match="infeasible budget.*minimum"):
        route_batch(config)
    assert not (tmp_path / "out" / "tiny").exists()
    deferred = route_batch(_config(tmp_path, small_routing_model, budget_per_query_usd=None,
                                   budget_usd=1e-9, run_id="tiny", defer=True))
    assert deferred["counts"]["deferred"] + deferred["counts"]["routed"] == 100


def test_empty_input_is_rejected(tmp_path, ray_local, small_routing_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jsonl").write_text("")
    pq.write_table(pa.table({"query_id": pa.array([], pa.string()),
                             "query": pa.array([], pa.string())}), tmp_path / "in" / "e.parquet")
    with pytest.raises(R2RayError, match="holds no queries"):
        route_batch(_config(tmp_path, small_routing_model, run_id="empty"))
    assert not (tmp_path / "out" / "empty").exists()
