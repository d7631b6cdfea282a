"""The nightly batch job on Ray Data: read → validate → score → solve → assign → write → commit.

Each stage is a plain function over Arrow tables (in :mod:`r2ray.backlog`, :mod:`r2ray.scoring`,
:mod:`r2ray.solver`, :mod:`r2ray.routing`); this module only composes them on Ray and keeps the
books: counts, spend, timings, the report and the manifest that commits the run.

Crash safety: every file a stage writes has a name derived from its input (file index and row
group, or the first order key of a block), so a retried task overwrites rather than duplicates;
the manifest is written last, and a run id without one is cleared and redone on the next attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r2ray import __version__, storage
from r2ray.backlog import (QUARANTINE_SCHEMA, ROW_BITS, ReadUnit, duplicate_reason, plan_units,
                           read_and_validate)
from r2ray.catalog import Catalog, catalog_from_dict, load_catalog
from r2ray.config import RouteConfig
from r2ray.errors import R2RayError
from r2ray.failpoints import failpoint
from r2ray.routing import routed_request
from r2ray.redaction import redact_text, redact_values
from r2ray.report import STATS_SCHEMA
from r2ray.runs import (RunPaths, abandon, check_output, commit, input_fingerprint, is_committed,
                        read_manifest, routed_partition, start_attempt)

ROUTED_SCHEMA = pa.schema([
    pa.field("query_id", pa.string()),
    pa.field("tenant", pa.string()),
    pa.field("model", pa.string()),
    pa.field("budget", pa.int32()),            # output tokens, 0 = default
    pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    pa.field("max_tokens", pa.int64()),        # hard cap sent to the model
    pa.field("q_hat", pa.float32()),           # predicted quality
    pa.field("t_hat", pa.float32()),           # predicted output tokens
    pa.field("c_hat_usd", pa.float64()),       # predicted cost, USD
    pa.field("lambda_star", pa.float64()),     # price of budget, quality per USD
    pa.field("model_version", pa.string()),
    pa.field("run_id", pa.string()),
])


TASK_CPUS = 0.25
"""CPUs of each small Ray task (read, dedupe, solve, assign): fractional, so a 2-core machine runs
several beside the scoring actors instead of starving them."""


class EmptyInput(R2RayError):
    pass


@contextmanager
def _timed(timings: dict, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


# ---- read + validate (Ray tasks, one read unit per call) -------------------------------------------
def read_stage(batch: dict, quarantine_uri: str, max_context_tokens: int, embedding_dim: int,
               embedding_required: bool) -> pa.Table:
    """Read units → good rows; each unit's bad rows go to ``quarantine/part-<file>-<group>``."""
    from r2ray.backlog import empty_good
    from r2ray.bench.io import write_table

    goods = [empty_good()]
    for i in range(len(batch["source"])):
        row_group = batch["row_group"][i]
        unit = ReadUnit(str(batch["source"][i]), int(batch["file_index"][i]),
                        None if row_group is None or row_group < 0 else int(row_group),
                        int(batch["first_row"][i]))
        good, bad = read_and_validate(unit, max_context_tokens, embedding_dim, embedding_required)
        if bad.num_rows:
            name = f"part-f{unit.file_index:06d}-g{max(unit.row_group or 0, 0):06d}.parquet"
            write_table(bad, storage.join(quarantine_uri, name))
        goods.append(good)
    return pa.concat_tables(goods)


def _unit_items(units: list[ReadUnit]) -> list[dict]:
    return [dict(dataclasses.asdict(u), row_group=-1 if u.row_group is None else u.row_group)
            for u in units]


# ---- duplicates ------------------------------------------------------------------------------
def first_seen_duplicates(scored, n_buckets: int = 4) -> dict[str, int]:
    """{query_id: lowest order key} for ids that occur more than once.

    A small hash shuffle over the materialised blocks: each block splits its (id, order) pairs
    into ``n_buckets`` by a hash of the id, each bucket finds its repeated ids; the driver only
    ever holds the repeated ones.
    """
    import ray

    split = ray.remote(num_cpus=TASK_CPUS, num_returns=n_buckets)(_id_buckets)
    find = ray.remote(num_cpus=TASK_CPUS)(_repeated_ids)
    parts = [split.remote(ref, n_buckets) for ref in scored.to_arrow_refs()]
    parts = [p if isinstance(p, list) else [p] for p in parts]
    found = ray.get([find.remote(*[p[b] for p in parts]) for b in range(n_buckets)])
    table = pa.concat_tables(found)
    return dict(zip(table.column("query_id").to_pylist(),
                    table.column("first_order").to_pylist()))


def _id_buckets(block: pa.Table, n_buckets: int) -> list[pa.Table]:
    ids = block.select(["query_id", "order"]).cast(
        pa.schema([("query_id", pa.string()), ("order", pa.int64())]))
    # crc32, not hash(): string hashes differ between worker processes
    bucket = np.fromiter((zlib.crc32(q.encode()) % n_buckets
                          for q in ids.column("query_id").to_pylist()),
                         dtype=np.int64, count=ids.num_rows)
    parts = [ids.filter(pa.array(bucket == b)) for b in range(n_buckets)]
    return parts if n_buckets > 1 else parts[0]


def _repeated_ids(*parts: pa.Table) -> pa.Table:
    table = pa.concat_tables(parts)
    counts = table.group_by("query_id").aggregate([("order", "count"), ("order", "min")])
    repeated = counts.filter(pa.compute.greater(counts.column("order_count"), 1))
    return pa.table({"query_id": repeated.column("query_id"),
                     "first_order": repeated.column("order_min")})


def drop_rows_stage(batch: pa.Table, duplicates: dict[str, int], sources: dict[int, str],
                    quarantine_uri: str) -> pa.Table:
    """Quarantine repeated query ids (all but the lowest-order row) and keep the rest.

    ``sources``: input file index → URI; each record keeps its file, row and raw content.
    """
    from r2ray.backlog import is_duplicate, raw_rows
    from r2ray.bench.io import write_table

    orders = batch.column("order").to_numpy()
    repeated = is_duplicate(orders, batch.column("query_id").combine_chunks(), duplicates)
    if repeated.any():
        index = np.flatnonzero(repeated)
        ids = batch.column("query_id").take(pa.array(index)).to_pylist()
        files = orders[index] >> ROW_BITS
        rows = (orders[index] & ((1 << ROW_BITS) - 1)) + 1
        raw = {}
        for file_index in np.unique(files):
            raw[file_index] = raw_rows(sources[int(file_index)], rows[files == file_index].tolist())
        records = [{"source": sources[int(f)], "row": int(r), "query_id": query_id,
                    "reason": duplicate_reason(duplicates[query_id], sources), "raw": raw[f][int(r)]}
                   for f, r, query_id in zip(files, rows, ids)]
        write_table(pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA),
                    storage.join(quarantine_uri, f"part-dup-{int(orders.min()):016x}.parquet"))
    return batch.filter(pa.array(~repeated))


# ---- assign + render + write ----------------------------------------------------------------
def assign_stage(batch: pa.Table, catalog_yaml: str, routed_uri: str, deferred_uri: str,
                 lam: float, model_version: str, run_id: str) -> pa.Table:
    """Chosen arms (``arm`` column from the solve) → routed prompts written per model.

    Returns per-(model, budget) sums for the report; queries on the defer arm or on no arm are
    written to ``deferred/`` with the reason.
    """
    import yaml

    from r2ray.bench.io import write_table
    from r2ray.solver import DEFER_ARM

    catalog = catalog_from_dict(yaml.safe_load(catalog_yaml), "catalogue")
    arm = batch.column("arm").to_numpy()
    routed = arm >= 0
    part = f"part-{int(batch.column('order').to_numpy().min()):016x}.parquet" \
        if batch.num_rows else "part-empty.parquet"
    if (~routed).any():
        reasons = np.where(arm[~routed] == DEFER_ARM, "deferred: the budget could not pay for it",
                           "no arm available: every prediction was NaN/inf or too long")
        rest = batch.filter(pa.array(~routed))
        write_table(pa.table({"query_id": rest.column("query_id"), "query": rest.column("query"),
                              "reason": pa.array(reasons, pa.string())}),
                    storage.join(deferred_uri, part))
    chosen = _chosen_columns(batch.filter(pa.array(routed)), arm[routed], catalog)
    stats = []
    for model in sorted(set(chosen["model"])):
        rows = chosen["model"] == model
        table = _routed_table(batch.filter(pa.array(routed)).filter(pa.array(rows)),
                              {k: v[rows] for k, v in chosen.items()}, catalog, lam,
                              model_version, run_id)
        write_table(table, storage.join(routed_uri, routed_partition(model), part))
        for budget in np.unique(chosen["budget"][rows]):
            sel = rows & (chosen["budget"] == budget)
            stats.append({"model": model, "budget": int(budget), "queries": int(sel.sum()),
                          "spend_usd": float(chosen["c_hat"][sel].sum(dtype=np.float64)),
                          "quality_sum": float(chosen["q_hat"][sel].sum(dtype=np.float64)),
                          "tokens_sum": float(chosen["t_hat"][sel].sum(dtype=np.float64))})
    return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)


def assign_block(block: pa.Table, arms: pa.Table, settings: dict) -> pa.Table:
    """One scored block with the solve's arms for it (same rows, same order; checked)."""
    if not np.array_equal(block.column("query_pos").to_numpy(), arms.column("query_pos").to_numpy()):
        raise RuntimeError("solver arms are not aligned with the scored block")
    return assign_stage(block.append_column("arm", arms.column("arm")), **settings)


def _chosen_columns(batch: pa.Table, arm: np.ndarray, catalog: Catalog) -> dict[str, np.ndarray]:
    """Predicted q̂, t̂, ĉ of each query's chosen arm, read back from its hull chain columns."""
    step_arm, offsets = _list_values(batch.column("step_arm"))
    dq, _ = _list_values(batch.column("dq"))
    dc, _ = _list_values(batch.column("dc"))
    n = batch.num_rows
    # position along the chain: 0 = the base arm, t = the arm reached by step t
    step_query = np.repeat(np.arange(n), np.diff(offsets))
    local = np.arange(len(step_arm)) - offsets[:-1][step_query]
    pos = np.zeros(n, dtype=np.int64)
    hit = step_arm == arm[step_query]
    pos[step_query[hit]] = local[hit] + 1
    taken = local < pos[step_query]
    tokens, token_offsets = _list_values(batch.column("hull_tokens"))
    arrays = catalog.arm_arrays
    return {"arm": arm,
            "model": np.array(catalog.model_names, dtype=object)[arrays["model_index"][arm]],
            "budget": arrays["budget_tokens"][arm],
            "q_hat": batch.column("base_q").to_numpy()
            + np.bincount(step_query[taken], weights=dq[taken], minlength=n),
            "c_hat": batch.column("base_c").to_numpy()
            + np.bincount(step_query[taken], weights=dc[taken], minlength=n),
            "t_hat": tokens[token_offsets[:-1] + pos]}


def _list_values(column) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(array.offsets, dtype=np.int64)
    return array.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _routed_table(batch: pa.Table, chosen: dict, catalog: Catalog, lam: float,
                  model_version: str, run_id: str) -> pa.Table:
    queries = batch.column("query").to_pylist()
    input_tokens = batch.column("input_tokens").to_numpy()
    requests = [routed_request(q, int(a), catalog, int(t))
                for q, a, t in zip(queries, chosen["arm"], input_tokens)]
    n = batch.num_rows
    return pa.table({
        "query_id": batch.column("query_id"),
        "tenant": batch.column("tenant_name"),
        "model": pa.array([r["model"] for r in requests], pa.string()),
        "budget": pa.array([r["budget"] for r in requests], pa.int32()),
        "messages": pa.array([r["messages"] for r in requests], ROUTED_SCHEMA.field("messages").type),
        "max_tokens": pa.array([r["max_tokens"] for r in requests], pa.int64()),
        "q_hat": pa.array(chosen["q_hat"], pa.float32()),
        "t_hat": pa.array(chosen["t_hat"], pa.float32()),
        "c_hat_usd": pa.array(chosen["c_hat"], pa.float64()),
        "lambda_star": pa.array(np.full(n, lam), pa.float64()),
        "model_version": pa.array([model_version] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
    }, schema=ROUTED_SCHEMA)


# ---- the job ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadedModel:
    files: dict[str, bytes]   # the saved predictor, shipped to workers
    catalog: Catalog
    embedding_dim: int
    has_encoder: bool
    uri: str
    name: str
    version: str

    @property
    def label(self) -> str:
        """``NAME/VERSION`` for a registered model, the folder for a local one."""
        return self.uri if self.version == "local" else f"{self.name}/{self.version}"


def load_model(model_uri: str, catalog_path: str | None, tracking_uri: str | None) -> LoadedModel:
    """Resolve the model on the driver once; workers get its files through the object store."""
    import tempfile

    from r2ray.predictor.persist import save_predictor
    from r2ray.registry import load_registered
    from r2ray.scoring import has_encoder, predictor_files

    bundle = load_registered(model_uri, tracking_uri, device="cpu")
    catalog = bundle.catalog
    if catalog_path is not None:
        override = load_catalog(catalog_path)
        if override.arms != catalog.arms:
            raise R2RayError(f"--catalog {catalog_path} offers other arms than the model was "
                             f"trained on ({override.n_arms} vs {catalog.n_arms}); prices may "
                             "change, arms may not — retrain for a new arm set")
        catalog = override
    with tempfile.TemporaryDirectory(prefix="r2ray-model-") as folder:
        save_predictor(bundle.predictor, folder, encoder_spec=bundle.encoder_spec)
        files = predictor_files(folder)
    version = bundle.version
    return LoadedModel(files, catalog, int(bundle.predictor.embedding_dim_),
                       has_encoder(bundle.encoder_spec), model_uri,
                       version.name if version else model_uri,
                       version.version if version else "local")


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Ray 2.60 turns token auth on for a local instance and logs a notice every time; the
        # README says so once (the `ray job` CLIs need RAY_AUTH_MODE=token), the job stays quiet
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
        ray.init(address=address, include_dashboard=False if not address else None,
                 ignore_reinit_error=True, log_to_driver=True)


def _count_rows(uri: str) -> int:
    if not storage.exists(uri):
        return 0
    total = 0
    for part in storage.list_files(uri, (".parquet",)):
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def quarantine_counts(uri: str) -> dict[str, int]:
    """Quarantine records: row-level ones, duplicates among them, and whole unreadable files."""
    if not storage.exists(uri):
        return {"records": 0, "rows": 0, "duplicates": 0, "files": 0}
    from r2ray.bench.io import read_table

    tables = [read_table(part).select(["row", "reason"])
              for part in storage.list_files(uri, (".parquet",))]
    table = pa.concat_tables(tables)
    file_level = int(table.column("row").null_count)
    duplicates = int(np.sum(pa.compute.starts_with(table.column("reason"), "duplicate")
                            .to_numpy(zero_copy_only=False)))
    return {"records": table.num_rows, "rows": table.num_rows - file_level,
            "duplicates": duplicates, "files": file_level}


def _log_report(manifest: dict, stats: pa.Table, tracking_uri: str | None, log) -> str | None:
    """The MLflow run is a report: if tracking is down, warn and still commit the routed output."""
    try:
        return log(manifest, stats, tracking_uri)
    except Exception as err:  # noqa: BLE001 — any tracking failure must not lose a finished run
        print(f"warning: could not log the batch to MLflow ({type(err).__name__}: "
              f"{redact_text(str(err))})", file=sys.stderr)
        return None


def route_batch(config: RouteConfig) -> dict:
    """Run one batch routing job; returns the committed manifest (see :mod:`r2ray.runs`).

    Every argument (input, output, model, catalogue) is checked before anything is written or
    removed; the run then works in a fresh attempt folder that only its manifest commits.
    """
    timings: dict[str, float] = {}
    paths = RunPaths(config.output, config.resolved_run_id())
    with _timed(timings, "plan"), storage.reporting(f"cannot read the input {config.input}"):
        units, unreadable = plan_units(config.input)
        files = sorted({u.source for u in units} | set(unreadable.column("source").to_pylist()))
        fingerprint = input_fingerprint(files)
    with storage.reporting(f"cannot use the output {paths.root}"):
        check_output(paths, files)
        if not config.force and is_committed(paths):
            return _already_committed(paths, config, fingerprint)
    with _timed(timings, "load_model"):
        model = load_model(config.model, config.catalog, config.tracking_uri)
    with storage.reporting(f"cannot write to the output {paths.root}"):
        attempt, state = start_attempt(paths, fingerprint, config.force)
    try:
        return _route_attempt(config, attempt, state, model, units, unreadable, files,
                              fingerprint, timings)
    except R2RayError:
        abandon(attempt, state)   # a clean refusal leaves nothing behind (a crash does: redo it)
        raise


def _already_committed(paths: RunPaths, config: RouteConfig, fingerprint: str) -> dict:
    """The committed manifest, with a warning naming each setting this call changes."""
    manifest = read_manifest(paths)
    before = manifest.get("config", {})
    changed = [f"{name} ({_show(before.get(name))} → {_show(value)})"
               for name, value in redact_values(config.model_dump()).items()
               if name in DECISION_SETTINGS and before.get(name) != value]
    if manifest.get("input", {}).get("fingerprint") != fingerprint:
        changed.insert(0, "input files (their fingerprint differs)")
    if changed:
        print(f"warning: run {paths.run_id} is already committed with other settings: "
              f"{'; '.join(changed)}. Nothing was redone: pass --force to redo it, or use a new "
              "--run-id.", file=sys.stderr)
    else:
        print(f"run {paths.run_id} is already committed at {paths.manifest}; nothing to do "
              "(--force redoes it)", file=sys.stderr)
    return manifest


DECISION_SETTINGS = ("input", "model", "budget_usd", "budget_per_query_usd", "reserve", "catalog",
                     "defer", "seed")
"""Settings that change what a run decides; re-running a committed run id with others warns."""


def _show(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _route_attempt(config: RouteConfig, paths: RunPaths, state: str, model: LoadedModel,
                   units: list[ReadUnit], unreadable: pa.Table, files: list[str],
                   fingerprint: str, timings: dict) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    from r2ray.bench.io import write_table
    from r2ray.report import combine_stats, log_to_mlflow, spend_by_model, write_report
    from r2ray.scoring import ScoreWorker
    from r2ray.solver import InfeasibleBudget
    from r2ray.solver.distributed import solve_dataset

    if unreadable.num_rows:
        write_table(unreadable, storage.join(paths.quarantine, "part-unreadable.parquet"))
    sources = {u.file_index: u.source for u in units}
    _init_ray()
    max_context = max(m.context for m in model.catalog.models)
    with _timed(timings, "read_validate_score"):
        queries = ray.data.from_items(_unit_items(units) or [], override_num_blocks=max(
            1, len(units))).map_batches(
            read_stage, batch_size=1, batch_format="numpy", num_cpus=TASK_CPUS,
            fn_kwargs={"quarantine_uri": paths.quarantine, "max_context_tokens": max_context,
                       "embedding_dim": model.embedding_dim,
                       "embedding_required": not model.has_encoder})
        if len(units) < config.workers * config.blocks_per_worker:  # few big files: spread them
            queries = queries.repartition(config.workers * config.blocks_per_worker)
        scored = queries.map_batches(
            ScoreWorker, batch_size=config.batch_size, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=config.workers), num_cpus=config.cpus_per_worker,
            num_gpus=config.gpus_per_worker or None,
            fn_constructor_kwargs={"files": model.files,
                                   "catalog_yaml": model.catalog.to_yaml()},
            ).materialize()  # Ray Data restarts lost actors and retries their tasks by default
    with _timed(timings, "deduplicate"):
        duplicates = first_seen_duplicates(scored) if scored.count() else {}
        solvable = scored if not duplicates else scored.map_batches(
            drop_rows_stage, batch_format="pyarrow", batch_size=None, num_cpus=TASK_CPUS,
            fn_kwargs={"duplicates": duplicates, "sources": sources,
                       "quarantine_uri": paths.quarantine},
        ).materialize()
        n_solvable = solvable.count()
    if n_solvable == 0 and quarantine_counts(paths.quarantine)["records"] == 0:
        raise EmptyInput(f"input {config.input} holds no queries ({len(files)} file(s), 0 rows)")
    budget_usd = (config.budget_usd if config.budget_usd is not None
                  else config.budget_per_query_usd * n_solvable)
    usable_usd = budget_usd * (1.0 - config.reserve)
    certificate, stats = None, combine_stats(pa.Table.from_pylist([], schema=STATS_SCHEMA))
    if n_solvable:  # else every row was quarantined: commit that, so the night is on record
        with _timed(timings, "solve"):
            try:
                solved = solve_dataset(solvable, usable_usd, seed=config.seed,
                                       defer=config.defer, num_cpus=TASK_CPUS)
            except InfeasibleBudget as err:
                raise R2RayError(f"infeasible budget: {err} (usable budget {_usd(usable_usd)} "
                                 f"after a {config.reserve:.0%} reserve); nothing was "
                                 "committed") from None
        certificate = solved.certificate
        with _timed(timings, "assign_write"):
            assign = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(assign_block)
            settings = ray.put({"catalog_yaml": model.catalog.to_yaml(),
                                "routed_uri": paths.routed, "deferred_uri": paths.deferred,
                                "lam": certificate.lam, "model_version": model.label,
                                "run_id": paths.run_id})
            stats_parts = [assign.remote(block, arms, settings) for block, arms in
                           zip(solvable.to_arrow_refs(), solved.arms.to_arrow_refs(), strict=True)]
            stats = combine_stats(pa.concat_tables(ray.get(stats_parts)))
    failpoint("before_commit")
    routed = int(np.sum(stats.column("queries").to_numpy()))
    quarantine = quarantine_counts(paths.quarantine)
    deferred = _count_rows(paths.deferred)
    predicted_spend = float(np.sum(stats.column("spend_usd").to_numpy(), dtype=np.float64))
    manifest = {
        "run_id": paths.run_id,
        "state_before": state,
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "r2ray_version": __version__,
        "counts": {"rows_in": routed + deferred + quarantine["rows"], "routed": routed,
                   "quarantined": quarantine["rows"], "duplicates": quarantine["duplicates"],
                   "deferred": deferred, "unreadable_files": quarantine["files"]},
        "spend": {"budget_usd": budget_usd, "reserve": config.reserve, "usable_usd": usable_usd,
                  "predicted_usd": predicted_spend, "by_model": spend_by_model(stats)},
        "solve": None if certificate is None else _solve_record(certificate),
        "model": {"uri": model.uri, "name": model.name, "version": model.version},
        "catalog_fingerprint": model.catalog.fingerprint,
        "input": {"uri": config.input, "files": len(files), "fingerprint": fingerprint},
        "output": {"routed": paths.routed, "quarantine": paths.quarantine,
                   "deferred": paths.deferred},
        "timings": timings,
        "config": config.model_dump(),
    }
    manifest["artifacts"] = write_report(paths.path(), manifest, stats)
    manifest["mlflow_run_id"] = _log_report(manifest, stats, config.tracking_uri, log_to_mlflow)
    commit(paths, manifest)
    return manifest


def _solve_record(certificate) -> dict:
    return {"lambda": certificate.lam, "theta": certificate.theta,
            "tie_cut": certificate.tie_cut, "seed": certificate.seed,
            "objective": certificate.objective, "lp_value": certificate.lp_value,
            "upper_bound": certificate.upper_bound, "gap": certificate.gap,
            "steps": certificate.n_steps, "steps_taken": certificate.n_steps_taken,
            "filled": certificate.n_filled, "invalid_arms": certificate.n_invalid_arms}


def _usd(value: float) -> str:
    """Money for people: six significant digits, whatever the magnitude ($1e+300, $0.399998)."""
    return f"${value:.6g}"


def summarise_manifest(manifest: dict) -> str:
    """A few lines for the terminal: where the run is, what it routed, what it spent."""
    counts, spend, solve = manifest["counts"], manifest["spend"], manifest["solve"]
    lines = [
        f"run {manifest['run_id']} committed at {manifest['committed_at']} "
        f"({manifest['output']['routed'].rsplit('/routed', 1)[0]})",
        f"  queries: {counts['rows_in']:,} in, {counts['routed']:,} routed, "
        f"{counts['quarantined']:,} quarantined ({counts['duplicates']:,} duplicates), "
        f"{counts['deferred']:,} deferred, {counts['unreadable_files']} unreadable file(s)",
        f"  spend: predicted {_usd(spend['predicted_usd'])} of {_usd(spend['usable_usd'])} "
        f"usable (budget {_usd(spend['budget_usd'])}, reserve {spend['reserve']:.0%})",
        "  no query could be routed: every row was quarantined (see quarantine/)" if solve is None
        else f"  λ* = {solve['lambda']:.6g} quality/USD, θ* = {solve['theta']:.4f}, "
             f"objective {solve['objective']:.3f} ≤ bound {solve['upper_bound']:.3f} "
             f"(gap {solve['gap']:.3g})",
        "  by model: " + (", ".join(f"{m} {v['queries']:,} ({_usd(v['spend_usd'])})" for m, v in
                                    sorted(spend["by_model"].items(),
                                           key=lambda kv: -kv[1]["spend_usd"])) or "none"),
        "  seconds: " + ", ".join(f"{k} {v}" for k, v in manifest["timings"].items()),
    ]
    return "\n".join(lines)
