"""``r2ray execute``: a committed batch run's routed prompts → the pool's answers → actuals.

The routed rows already carry the chat messages (the length instruction) and the hard
``max_tokens`` the run planned with; they are sent as they are. The actuals are what
``r2ray reconcile`` reads: ``run_id, query_id, model, budget, input_tokens, output_tokens,
cost_usd`` plus ``response``, ``truncated``, ``usage_estimated``, ``finish_reason`` and
``latency_s``. ``run_id`` (the run's, from its manifest) lets reconcile refuse another night's
bills: nightly backlogs reuse query ids, so the key alone matched them. For the same reason the
work folder is bound to the run it executes (:func:`work_binding`): another run's is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from r2ray import __version__, storage
from r2ray.batch.report import usd_digits
from r2ray.bench.io import check_output_name, write_table
from r2ray.execution.engine import EngineConfig, EngineRun, plan, run_requests
from r2ray.execution.requests import request_row, requests_table, worst_case_usd
from r2ray.execution.workdir import check_work, commit_work, open_work
from r2ray.redaction import redact_uri, redact_values

ACTUALS_COLUMNS = ["run_id", "query_id", "model", "budget", "input_tokens", "output_tokens",
                   "cost_usd", "response", "truncated", "usage_estimated", "finish_reason",
                   "latency_s"]
ENGINE_COLUMNS = ACTUALS_COLUMNS[1:]   # what the engine's results hold; run_id is the run's
ROUTED_READ = ["query_id", "model", "budget", "messages", "max_tokens"]


@dataclass(frozen=True)
class ExecuteConfig:
    run: str                       # OUTPUT/RUN_ID of a committed run
    out: str                       # actuals, .parquet or .jsonl
    work: str | None = None
    catalog: str | None = None
    tracking_uri: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def work_dir(self) -> str:
        return self.work or self.out.rsplit(".", 1)[0] + ".work"


def routed_requests(config: ExecuteConfig) -> tuple[dict, pa.Table]:
    """(the run's manifest, one request per routed row) with the run's messages and caps."""
    from r2ray.reconcile.run import committed_manifest, run_catalog

    manifest = committed_manifest(config.run)
    catalog = run_catalog(manifest, config.catalog, config.tracking_uri)
    rows = []
    with storage.reporting(f"cannot read the routed rows of {redact_uri(config.run)}"):
        for part in storage.list_files(manifest["output"]["routed"], (".parquet",)):
            fs, path = storage.filesystem(part)
            with fs.open(path, "rb") as handle:   # one file at a time: model=<name> is no column
                for r in pq.read_table(handle, columns=ROUTED_READ).to_pylist():
                    rows.append(request_row(catalog, "answer", r["query_id"], r["model"],
                                            r["budget"], r["messages"], r["max_tokens"]))
    return manifest | {"_catalog": catalog}, requests_table(rows)


@dataclass
class ExecuteResult:
    actuals_rows: int
    run: EngineRun
    manifest: dict

    def summary(self) -> str:
        lines = [f"actuals: {self.actuals_rows:,} rows → {redact_uri(self.manifest['actuals'])} "
                 f"({self.run.failures.num_rows:,} failed calls)",
                 f"spend: ${usd_digits(self.run.spend['realised_usd'])}"]
        for endpoint, t in self.run.throughput.items():
            lines.append(f"  {endpoint}: {t['calls']} calls, {t['calls_per_s']:.2f} calls/s, "
                         f"{t['output_tokens_per_s']:.1f} output tokens/s")
        if self.run.failures.num_rows:
            lines.append(f"failures: {self.run.summary()['failure_reasons']} — rerun to retry")
        lines.append(f"next: r2ray reconcile --run {redact_uri(self.manifest['run'])} "
                     f"--actuals {redact_uri(self.manifest['actuals'])}")
        return "\n".join(lines)


def work_binding(manifest: dict, requests: pa.Table) -> dict:
    """What the work folder answers: the run (its id) and its routed calls (a sha256 over each
    request's key and prompt hash), so the calls of another night, whose query ids and prompts
    recur, are never taken for this run's; a rerun of this run resumes."""
    sent = sorted(f"{key}@{sha}" for key, sha in zip(requests["key"].to_pylist(),
                                                     requests["prompt_sha"].to_pylist()))
    return {"kind": "execute", "run_id": manifest.get("run_id"),
            "routed_fingerprint": hashlib.sha256("\n".join(sent).encode()).hexdigest()}


def dry_run(config: ExecuteConfig) -> str:
    manifest, requests = routed_requests(config)
    check_work(config.work_dir, work_binding(manifest, requests))
    todo, done = plan(requests, storage.join(config.work_dir, "calls"),
                      config.engine.unrecorded == "reuse")
    return (f"dry run: {todo.num_rows:,} calls to make ({done.num_rows:,} already done), "
            f"worst case ${usd_digits(worst_case_usd(todo))} at the caps")


def execute_run(config: ExecuteConfig, progress=None) -> ExecuteResult:
    check_output_name(config.out, "--out")
    manifest, requests = routed_requests(config)
    catalog = manifest.pop("_catalog")
    open_work(config.work_dir, work_binding(manifest, requests))
    run = run_requests(requests, storage.join(config.work_dir, "calls"), catalog, config.engine,
                       progress)
    actuals = with_run_id(run.results.select(ENGINE_COLUMNS), manifest.get("run_id"))
    write_table(actuals, config.out)
    record = {"kind": "execute", "r2ray_version": __version__, "run": config.run,
              "run_id": manifest.get("run_id"), "actuals": config.out,
              "catalog_fingerprint": catalog.fingerprint,
              "counts": {"routed": requests.num_rows, "actuals": actuals.num_rows},
              "calls": run.summary()}
    commit_work(config.work_dir, redact_values(record))
    return ExecuteResult(actuals.num_rows, run, record)


def with_run_id(results: pa.Table, run_id: str | None) -> pa.Table:
    """``results`` with the run's id as their first column (ACTUALS_COLUMNS)."""
    return results.add_column(0, "run_id", pa.array([run_id] * results.num_rows, pa.string()))
