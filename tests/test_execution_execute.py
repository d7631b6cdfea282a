"""``r2ray execute``: a committed run's routed prompts → stub answers → actuals → reconcile."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from r2ray.batch.assign import ROUTED_SCHEMA
from r2ray.catalog import load_catalog
from r2ray.cli import main
from r2ray.execution.stub import StubServer
from r2ray.manifest import routed_partition
from r2ray.reconcile import read_actuals
from r2ray.routing import routed_request


def write_catalog(path, url: str, price_scale: float = 1.0) -> str:
    """Two priced models on the stub, budgets 4, 12 and default (cap 24); ``price_scale``
    multiplies both models' prices (USD per million tokens)."""
    path.write_text(yaml.safe_dump({"budgets": [4, 12, "default"], "models": [
        {"name": name, "input_per_m": p_in * price_scale, "output_per_m": p_out * price_scale,
         "context": 4096, "endpoint": url, "max_output_tokens": 24}
        for name, p_in, p_out in [("small", 1.0, 2.0), ("large", 10.0, 30.0)]]}))
    return str(path)


def committed_run(root, catalog_path: str, n: int = 12, run_id: str = "night") -> str:
    """A run folder as ``r2ray route`` commits it: routed parts per model, manifest last."""
    catalog = load_catalog(catalog_path)
    run = root / "out" / run_id
    attempt = run / "attempt-1"
    rows = []
    for i in range(n):
        arm = i % catalog.n_arms
        request = routed_request(f"say {i} [say:{' '.join(['w'] * i)}]", arm, catalog, 12)
        rows.append({"query_id": f"q{i}", "tenant": None, **request, "q_hat": 0.5, "t_hat": 3.0,
                     "c_hat_usd": 1e-5, "lambda_star": 1.0, "model_version": "m/1",
                     "run_id": run_id})
    table = pa.Table.from_pylist(rows, schema=ROUTED_SCHEMA)
    for model in catalog.model_names:
        folder = attempt / "routed" / routed_partition(model)
        folder.mkdir(parents=True)
        pq.write_table(table.filter(pa.compute.equal(table["model"], model)),
                       folder / "part-0.parquet")
    manifest = {"run_id": run_id, "catalog_fingerprint": catalog.fingerprint,
                "spend": {"budget_usd": 0.01}, "counts": {"routed": n},
                "model": {"uri": "/models/m", "name": "/models/m", "version": "local"},
                "output": {"routed": str(attempt / "routed")},
                "config": {"catalog": catalog_path}, "mlflow_run_id": None,
                "attempt": "attempt-1", "committed_at": "2026-12-01T00:00:00+00:00"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return str(run)


def test_execute_writes_actuals_that_reconcile_reads(tmp_path, capsys):
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        run = committed_run(tmp_path, catalog)
        out = str(tmp_path / "actuals.parquet")
        assert main(["execute", "--run", run, "--out", out, "--executor", "local",
                     "--dry-run"]) == 0
        assert "12 calls to make" in capsys.readouterr().out
        assert main(["execute", "--run", run, "--out", out, "--executor", "local"]) == 0
        assert "r2ray reconcile --run" in capsys.readouterr().out
        sent = {c["content"]: c["max_tokens"] for c in stub.calls}
    actuals = read_actuals(out).to_pylist()
    assert len(actuals) == 12 and all(a["invalid"] is None for a in actuals)
    routed = [r for part in (tmp_path / "out" / "night").glob("attempt-1/routed/*/*.parquet")
              for r in pq.read_table(part).to_pylist()]
    assert len(routed) == 12
    for row in routed:   # the run's own messages and caps were sent, as they are
        assert sent[row["messages"][-1]["content"]] == row["max_tokens"]
    by_id = {a["query_id"]: a for a in actuals}
    assert by_id["q11"]["output_tokens"] == min(11, {r["query_id"]: r["max_tokens"]
                                                     for r in routed}["q11"])
    assert all(a["cost_usd"] > 0 for a in actuals)
    assert main(["reconcile", "--run", run, "--actuals", out]) == 0
    assert "against 12 actuals rows" in capsys.readouterr().out


def test_execute_refuses_a_run_that_is_not_committed(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["execute", "--run", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "a.parquet"), "--executor", "local"]) == 2
    assert "holds no committed run" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["actuals.csv"])
def test_execute_refuses_an_output_no_reader_picks_up(tmp_path, capsys, name):
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        run = committed_run(tmp_path, catalog, n=2)
        assert main(["execute", "--run", run, "--out", str(tmp_path / name),
                     "--executor", "local"]) == 2
    assert ".parquet or .jsonl" in capsys.readouterr().err


def test_another_nights_actuals_are_refused_by_their_run_id(tmp_path, capsys):
    """Two nights over the same query ids and arms: night A's actuals reconciled as night B's
    were all matched and fitted B's correction (exit 0, correction.json written); execute
    writes the run's id and reconcile refuses actuals of which no row is the run's."""
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        run_a = committed_run(tmp_path, catalog, run_id="nightA")
        run_b = committed_run(tmp_path, catalog, run_id="nightB")
        out = str(tmp_path / "actuals_A.parquet")
        assert main(["execute", "--run", run_a, "--out", out, "--executor", "local"]) == 0
    capsys.readouterr()
    assert set(pq.read_table(out).column("run_id").to_pylist()) == {"nightA"}
    assert main(["reconcile", "--run", run_b, "--actuals", out]) == 2
    assert ("none of the 12 rows is of run 'nightB'; they name run(s) ['nightA']"
            in capsys.readouterr().err)
    assert not (tmp_path / "out" / "nightB" / "reconcile").exists()
    assert main(["reconcile", "--run", run_a, "--actuals", out]) == 0
    assert "against 12 actuals rows (12 usable)\n" in capsys.readouterr().out


def test_a_work_folder_of_another_run_is_refused_naming_both_runs(tmp_path, capsys):
    """Night B executed in night A's work folder: B's requests (same query ids, same routing)
    were answered by A's recorded calls, none sent, and A's bills written as B's actuals. The
    folder is bound to its run: another run's is refused (dry run too), its own rerun resumes."""
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        run_a = committed_run(tmp_path, catalog, run_id="nightA")
        run_b = committed_run(tmp_path, catalog, run_id="nightB")
        work = str(tmp_path / "work")
        execute = ["--work", work, "--executor", "local"]
        assert main(["execute", "--run", run_a, "--out", str(tmp_path / "A.parquet"),
                     *execute]) == 0
        assert len(stub.calls) == 12
        capsys.readouterr()
        for dry in ([], ["--dry-run"]):
            assert main(["execute", "--run", run_b, "--out", str(tmp_path / "B.parquet"),
                         *execute, *dry]) == 2
            err = capsys.readouterr().err
            assert "run_id 'nightA' there, 'nightB' here" in err and "fresh --work" in err
        assert not (tmp_path / "B.parquet").exists() and len(stub.calls) == 12
        (tmp_path / "work" / "work.json").unlink()   # a folder from before it was bound
        assert main(["execute", "--run", run_b, "--out", str(tmp_path / "B.parquet"),
                     *execute]) == 2
        assert "run_id 'nightA' there, 'nightB' here" in capsys.readouterr().err
        assert main(["execute", "--run", run_a, "--out", str(tmp_path / "A.parquet"),
                     *execute]) == 0   # its own run resumes: nothing sent again
        assert len(stub.calls) == 12
        assert main(["execute", "--run", run_b, "--out", str(tmp_path / "B.parquet"),
                     "--work", str(tmp_path / "work_B"), "--executor", "local"]) == 0
        assert len(stub.calls) == 24


def test_a_work_folder_of_the_same_run_id_routed_otherwise_is_refused(tmp_path, capsys):
    """The binding's second half: a run id committed again with other routed calls (6 queries
    where the folder answered 12) is refused naming the routed fingerprint, none sent; the run
    id alone would have let the folder's recorded calls answer it."""
    with StubServer() as stub:
        catalog = write_catalog(tmp_path / "pool.yaml", stub.url)
        first = committed_run(tmp_path / "first", catalog)
        again = committed_run(tmp_path / "again", catalog, n=6)
        execute = ["--work", str(tmp_path / "work"), "--executor", "local"]
        assert main(["execute", "--run", first, "--out", str(tmp_path / "A.parquet"),
                     *execute]) == 0
        capsys.readouterr()
        assert main(["execute", "--run", again, "--out", str(tmp_path / "B.parquet"),
                     *execute]) == 2
        err = capsys.readouterr().err
        assert "holds the calls of another run (routed_fingerprint '" in err
        assert not (tmp_path / "B.parquet").exists() and len(stub.calls) == 12


def _dollars(text: str, label: str) -> float:
    """The amount (USD) printed after ``label $`` in ``text``."""
    return float(re.search(re.escape(label) + r" \$([0-9.e+-]+)", text).group(1))


def test_the_dry_run_and_summary_print_a_small_spend_readably(tmp_path, capsys):
    """A cheap local model's night: ``.6f`` printed the dry run's worst case of $8.1e-07 as
    $0.000001 and the realised spend of $2.5e-07 as $0.000000. Each printed amount reads back
    as what was bid or billed: the worst case at 1e-4 of the prices is 1e-4 of the full-price
    run's, the spend the actuals' sum."""
    with StubServer() as stub:
        worst = []
        for scale in (1.0, 1e-4):
            folder = tmp_path / f"prices-{scale:g}"
            folder.mkdir()
            run = committed_run(folder, write_catalog(folder / "pool.yaml", stub.url, scale))
            execute = ["execute", "--run", run, "--out", str(folder / "actuals.parquet"),
                       "--work", str(folder / "work"), "--executor", "local"]
            assert main([*execute, "--dry-run"]) == 0
            worst.append(_dollars(capsys.readouterr().out, "worst case"))
        assert main(execute) == 0
    billed = pq.read_table(folder / "actuals.parquet").column("cost_usd").to_numpy().sum()
    assert 0 < billed < 1e-6
    assert _dollars(capsys.readouterr().out, "spend:") == pytest.approx(billed, rel=1e-5)
    assert worst[1] == pytest.approx(worst[0] * 1e-4, rel=1e-5)
