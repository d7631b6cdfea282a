"""The nightly batch job on Ray Data: read → validate → score → dedupe → solve → assign → write
→ commit.

Each stage is a plain function over Arrow tables (:mod:`.backlog`, :mod:`.score`, :mod:`.dedupe`,
:mod:`r2ray.solver`, :mod:`.assign`); this module only composes them on Ray and keeps the books:
counts, spend, timings, the report and the manifest that commits the run (:mod:`r2ray.manifest`).

Crash safety: every file a stage writes has a name derived from its input (file index and row
group, or the first order key of a block), so a retried task overwrites rather than duplicates;
the manifest is written last, and a run id without one is redone in a new attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from r2ray import __version__, storage
from r2ray.batch.backlog import (ReadUnit, footer_rows, plan_units, planned_rows, read_stage,
                                 unit_items)
from r2ray.batch.config import RouteConfig
from r2ray.catalog import Catalog, repriced_catalog
from r2ray.cluster import node_resources, ray_address
from r2ray.errors import R2RayError
from r2ray.failpoints import failpoint
from r2ray.lease import RunLease, acquire_lease
from r2ray.manifest import (RunPaths, abandon, check_output, drop_superseded,
                            input_fingerprint, is_committed, read_manifest, start_attempt,
                            write_manifest)
from r2ray.redaction import redact_text, redact_values

if TYPE_CHECKING:  # the predictor package imports torch: only the route itself needs it
    from r2ray.predictor.spend_guarantee import SpendPlan, SpendSimulation
    from r2ray.reconcile import CostCorrection
    from r2ray.registry import VersionInfo


class EmptyInput(R2RayError):
    pass


@contextmanager
def _timed(timings: dict, stage: str, announce: bool = True) -> Iterator[None]:
    """Time ``stage`` into ``timings`` (seconds), with a line on stderr as it starts and ends: the
    operator's progress through stages Ray Data shows none for (the solve, the assign and write,
    the report), and which stage a stalled night is in. ``announce=False``: timed only (the
    plan, before the lease: a run refused there says so in its one line, as the CLI promises)."""
    if announce:
        print(f"r2ray: {stage} …", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)
    if announce:
        print(f"r2ray: {stage} done in {timings[stage]} s", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    files: dict[str, bytes]   # the saved predictor, shipped to workers
    catalog: Catalog
    embedding_dim: int
    has_text_encoder: bool
    uri: str
    name: str
    version: str
    spend_simulation: SpendSimulation | None = None   # sizes the spend guarantee
    fingerprint: str | None = None   # the predictor's document_sha256 (persist.document_digest)


    @property
    def label(self) -> str:
        """``NAME/VERSION`` for a registered model; for a local one its folder, spelled one way
        (:func:`r2ray.storage.canonical_uri`): its cost corrections are found by this label, and
        ``/models/m/`` or ``./m`` missed those of ``/models/m``. A label may name another
        predictor later (a folder retrained in place, a registered name deleted and registered
        again), so corrections are matched by the predictor's :attr:`fingerprint` too."""
        return storage.canonical_uri(self.uri) if self.version == "local" else \
            f"{self.name}/{self.version}"


def load_model(model_uri: str, catalog_path: str | None, tracking_uri: str | None) -> LoadedModel:
    """Resolve the model on the driver once; workers get its files through the object store.

    A saved folder is read as its files and checked, not built, so the driver never imports
    torch for it (~2 s); a registered model is loaded through MLflow and saved to files. Its
    text encoder here must be the one it was trained with (:func:`r2ray.encoders.check_encoder`,
    by the fingerprint of its files): refused before anything is written, not in every worker."""
    model = (_registered_model(model_uri, tracking_uri) if model_uri.startswith("models:/")
             else _saved_model(model_uri))
    if catalog_path is not None:
        model = dataclasses.replace(
            model, catalog=repriced_catalog(catalog_path, model.catalog, model.label))
    return model


def _saved_model(folder: str) -> LoadedModel:
    from r2ray.encoders import check_encoder, has_text_encoder
    from r2ray.predictor.persist import predictor_fingerprint, read_saved, saved_catalog
    from r2ray.predictor.spend_guarantee import SpendSimulation

    document, files = read_saved(folder)
    check_encoder(document["encoder"], document.get("encoder_fingerprint"), folder)
    simulation = document["state"].get("spend_simulation")   # absent in older predictors
    return LoadedModel(files, saved_catalog(document, folder), int(document["embedding_dim"]),
                       has_text_encoder(document["encoder"]), folder, folder, "local",
                       SpendSimulation.from_json(simulation) if simulation else None,
                       predictor_fingerprint(document))


def _registered_model(model_uri: str, tracking_uri: str | None) -> LoadedModel:
    import tempfile

    from r2ray.batch.score import predictor_files
    from r2ray.encoders import check_encoder, has_text_encoder
    from r2ray.predictor.persist import save_predictor
    from r2ray.registry import load_registered

    bundle = load_registered(model_uri, tracking_uri, device="cpu")
    check_encoder(bundle.encoder_spec, bundle.predictor.encoder_fingerprint, model_uri)
    with tempfile.TemporaryDirectory(prefix="r2ray-model-") as folder:
        save_predictor(bundle.predictor, folder, encoder_spec=bundle.encoder_spec)
        files = predictor_files(folder)
    return LoadedModel(files, bundle.catalog, int(bundle.predictor.embedding_dim_),
                       has_text_encoder(bundle.encoder_spec), model_uri, bundle.version.name,
                       bundle.version.version, bundle.predictor.spend_simulation_,
                       bundle.predictor.saved_fingerprint_)


def check_solve_limit() -> None:
    """A bad ``R2RAY_LOCAL_SOLVE_BYTES`` fails the run before it scores anything, not at the
    solve after every query was scored (:func:`r2ray.solver.distributed.local_solve_limit`)."""
    from r2ray.solver.distributed import local_solve_limit_override

    local_solve_limit_override()


def check_guarantee(config: RouteConfig, model: LoadedModel) -> None:
    """A spend guarantee needs the model's spend simulation, one κ can be read from: refuse
    before anything is written, not after every query was scored."""
    if config.spend_guarantee <= 0 or config.strict_budget:
        return
    if model.spend_simulation is None:
        raise R2RayError(f"model {model.label} carries no spend simulation (it was saved before "
                         "r2ray fitted one, or its held-out rows were too few), so the spend "
                         "guarantee cannot be sized: retrain it, or pass --spend-guarantee 0 to "
                         "plan the whole budget on predicted costs")
    try:
        model.spend_simulation.check()
    except ValueError as err:
        raise R2RayError(f"model {model.label}: {err}") from None


def total_budget_usd(config: RouteConfig, n_queries: int) -> float:
    """The run's budget (USD): ``--budget-usd``, or ``--budget-per-query`` × the ``n_queries``
    left after dedupe, refused where that product overflows float64 (an infinite budget would
    plan an infinite limit and record NaN quality given up)."""
    if config.budget_usd is not None:
        return config.budget_usd
    total = config.budget_per_query_usd * n_queries
    if not math.isfinite(total):
        raise R2RayError(f"--budget-per-query {config.budget_per_query_usd!r} × {n_queries} "
                         "queries overflows a float64 budget: give a smaller budget")
    return total


def score_pool_options(pool) -> dict:
    """``map_batches`` options of the scoring actor pool of shape ``pool`` (a PoolShape)."""
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=pool.workers,
                                         max_tasks_in_flight_per_actor=pool.calls_in_flight),
            "num_cpus": pool.cpus_per_worker, "num_gpus": pool.gpus_per_worker or None}


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        sigterm = signal.getsignal(signal.SIGTERM)
        address = ray_address()   # checked: else ray.init retries an address nothing answers at
        # Ray 2.60 turns token auth on for a local instance and logs a notice every time; the
        # README says so once (the `ray job` CLIs need RAY_AUTH_MODE=token), the job stays quiet
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
        ray.init(address=address, include_dashboard=False if address in (None, "local") else None,
                 ignore_reinit_error=True, log_to_driver=True)
        _keep_sigterm_handler(sigterm)


def _keep_sigterm_handler(before) -> None:
    """Put back the Python SIGTERM handler ``ray.init`` replaced (in the main thread) with Ray's
    own, which exits with status 15 and no word on what to do: the CLI's (a stop as on Ctrl-C, its
    lease released) and the execution engine's (:class:`~r2ray.execution.engine.StopOnSignal`:
    the calls in flight recorded). Where none was set, Ray's stays."""
    if callable(before) and signal.getsignal(signal.SIGTERM) is not before:
        signal.signal(signal.SIGTERM, before)


def _parts(uri: str) -> list[str]:
    """The parquet parts under an output folder; none when it is absent or holds none (a folder
    made for a write that a killed task never finished holds only its temporary file), so the
    commit counts zero there instead of failing a finished run."""
    if not storage.exists(uri):
        return []
    try:
        return storage.list_files(uri, (".parquet",))
    except FileNotFoundError:
        return []


def _count_rows(uri: str) -> int:
    """Rows in the parquet parts under ``uri``, from their footers, read by a few threads (an
    object store answers each in tens of milliseconds; a million-row run has ~120 parts)."""
    from concurrent.futures import ThreadPoolExecutor

    def rows(part: str) -> int:
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    parts = _parts(uri)
    with ThreadPoolExecutor(max_workers=min(16, len(parts) or 1)) as pool:
        return sum(pool.map(rows, parts))


def _read_columns(part: str, columns: list[str], dictionary: tuple[str, ...] = ()) -> pa.Table:
    """``columns`` of one part; those in ``dictionary`` read dictionary-encoded (a URI repeated
    on every bad row of a file is held once)."""
    fs, path = storage.filesystem(part)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns, read_dictionary=list(dictionary) or None)


def check_assigned_parts(routed_uri: str, routed: int, deferred_uri: str | None = None,
                         deferred: int | None = None) -> None:
    """Refuse to commit unless ``routed/`` holds exactly the ``routed`` rows of the assign sums
    Ray kept, and ``deferred/`` the ``deferred`` rows left of the solve's (the solvable rows less
    the routed ones: each is routed or deferred, once). A part is named by its block's first
    order key, so a task run again on the same rows split into other blocks, or choosing other
    arms, would leave the earlier run's parts beside the new ones, and every consumer would read
    those rows twice (or a row as both routed and deferred). Reads the parts' footers only."""
    expected = [("routed", routed_uri, routed)]
    if deferred_uri is not None:
        expected.append(("deferred", deferred_uri, deferred))
    for what, uri, rows in expected:
        listed = _count_rows(uri)
        if listed != rows:
            raise RuntimeError(
                f"{uri} holds {listed} {what} rows but the assign stage {what} {rows}: a "
                "retried task left part files of an earlier run; nothing was committed (run the "
                "same run id again: it is redone in a new attempt)")


def check_rows_accounted(planned: int | None, solvable: int, quarantine: dict[str, int]) -> None:
    """Refuse to commit unless the rows the solve saw (``solvable``, after dedupe), the rows
    quarantined one by one (duplicates included) and the rows damaged units left unread (as
    their footers count them) add up to ``planned``, the input's own count from its parquet
    footers (:func:`r2ray.batch.backlog.footer_rows`; None: a jsonl file among the input, not
    checked). ``rows_in`` is derived from the same counts, so a block dropped or a slice not
    re-emitted by a retried task would otherwise only make it smaller."""
    if planned is None:
        return
    accounted = solvable + quarantine["rows"] + quarantine["unread_rows"]
    if accounted != planned:
        raise RuntimeError(
            f"the input's parquet footers count {planned} rows but the run accounts for "
            f"{accounted} ({solvable} solved, {quarantine['rows']} quarantined, "
            f"{quarantine['unread_rows']} left unread): rows were lost or repeated between the "
            "read and the solve; nothing was committed (run the same run id again: it is redone "
            "in a new attempt)")


def rows_check_words(units: list[ReadUnit]) -> str:
    """The manifest's ``input.rows_check``: whether the commit checked every row against the
    input's own count, and why not where it could not."""
    jsonl = len({u.source for u in units if u.rows is None})
    return "passed" if not jsonl else \
        f"skipped: {jsonl} jsonl file(s) in the input, whose rows are counted only as read"


def quarantine_counts(uri: str) -> dict[str, int]:
    """Quarantine records: row-level ones, duplicates among them, the files not read through (a
    file counted once however many of its row groups failed), and the rows those left unread
    where the parquet footers count them (``unread_rows``: none for a file whose footer, or a
    jsonl file, could not be read; such rows are in no other count). Reads no ``raw`` column: a
    night of bad rows is mostly its text, which the driver need not hold to count them."""
    parts = _parts(uri)
    if not parts:
        return {"records": 0, "rows": 0, "duplicates": 0, "files": 0, "unread_rows": 0}
    table = pa.concat_tables([_read_columns(part, ["source", "row", "reason", "unread_rows"],
                                            dictionary=("source",))
                              for part in parts])
    unit_level = table.filter(pa.compute.is_null(table.column("row")))
    duplicates = int(np.sum(pa.compute.starts_with(table.column("reason"), "duplicate")
                            .to_numpy(zero_copy_only=False)))
    return {"records": table.num_rows, "rows": table.num_rows - unit_level.num_rows,
            "duplicates": duplicates,
            "files": len(set(unit_level.column("source").to_pylist())),
            "unread_rows": int(pa.compute.sum(unit_level.column("unread_rows")).as_py() or 0)}


def _log_report(manifest: dict, stats: pa.Table, tracking_uri: str | None, log) -> str | None:
    """The MLflow run is a report: if tracking is down, warn and still commit the routed output."""
    try:
        return log(manifest, stats, tracking_uri)
    except Exception as err:  # noqa: BLE001 — any tracking failure must not lose a finished run
        print(f"warning: could not log the batch to MLflow ({type(err).__name__}: "
              f"{redact_text(str(err))})", file=sys.stderr)
        return None


def route_batch(config: RouteConfig) -> dict:
    """Run one batch routing job; returns the committed manifest (see :mod:`r2ray.manifest`).

    Every argument (input, output, model, catalogue) is checked before anything is written or
    removed; the run then works in a fresh attempt folder that only its manifest commits.
    """
    timings: dict[str, float] = {}
    # Ray Data (~1 s of imports here) loads while the job plans and reads the model; joined
    # before Ray starts, so the two threads never import Ray's own modules at once
    ray_data = in_background("r2ray-imports", lambda: importlib.import_module("ray.data"))
    paths = RunPaths(config.output, config.resolved_run_id())
    with _timed(timings, "plan", announce=False), storage.reporting(f"cannot read the input {config.input}"):
        units, unreadable = plan_units(config.input)
        files = sorted({u.source for u in units} | set(unreadable.column("source").to_pylist()))
        fingerprint = input_fingerprint(files)
    with storage.reporting(f"cannot use the output {paths.root}"):
        check_output(paths, files, config.input)
        if not config.force and is_committed(paths):
            return _already_committed(paths, config, fingerprint)
        lease = acquire_lease(paths)   # a second run of this run id is refused here, at once
    try:
        with _timed(timings, "load_model"):
            model = load_model(config.model, config.catalog, config.tracking_uri)
        check_guarantee(config, model)
        check_solve_limit()
        with storage.reporting(f"cannot read cost corrections under {paths.root}"):
            correction = find_correction(config, model)
        with storage.reporting(f"cannot write to the output {paths.root}"):
            attempt, state = start_attempt(paths, fingerprint, config.force)
        ray_data.join()
        try:
            return _route_attempt(config, attempt, state, model, correction, units, unreadable,
                                  files, fingerprint, timings, lease)
        except R2RayError:
            if lease.holds():
                abandon(attempt, state)   # a clean refusal leaves nothing (a crash does: redo it)
            else:   # the marker is the new holder's; the attempt is this run's alone, and the
                    # holder, if it committed already, no longer clears attempts: remove it here
                storage.remove(attempt.path())
            raise
    finally:
        lease.release()   # success or failure; a lease left by a killed process expires


def _already_committed(paths: RunPaths, config: RouteConfig, fingerprint: str) -> dict:
    """The committed manifest, with a warning naming each setting this call changes."""
    manifest = read_manifest(paths)
    before = UNRECORDED_SETTINGS | manifest.get("config", {})
    changed = [f"{name} ({_show(before.get(name))} → {_show(value)})"
               for name, value in redact_values(config.model_dump()).items()
               if name in DECISION_SETTINGS and before.get(name) != value]
    if manifest.get("input", {}).get("fingerprint") != fingerprint:
        changed.insert(0, "input files (their fingerprint differs)")
    moved = _model_moved(config, manifest.get("model") or {})
    if moved:
        changed.append(moved)
    if changed:
        print(f"warning: run {paths.run_id} is already committed with other settings: "
              f"{'; '.join(changed)}. Nothing was redone: pass --force to redo it, or use a new "
              "--run-id.", file=sys.stderr)
    else:
        print(f"run {paths.run_id} is already committed at {paths.manifest}; nothing to do "
              "(--force redoes it)", file=sys.stderr)
    return manifest


def _model_moved(config: RouteConfig, committed: dict) -> str | None:
    """Why the committed run's model is not the one ``config.model`` names now: an alias (or
    ``/latest``) that resolves to another version than the run used, though the URI is the same,
    a version number that names another predictor (the name deleted and registered again:
    :func:`_version_moved`), or a folder retrained in place (:func:`_folder_moved`). Asks the
    registry for the version and its tags only (no weights); where it cannot answer, says so."""
    from r2ray.registry import RegistryError, resolve_version

    uri, version = config.model, committed.get("version")
    if uri != committed.get("uri"):
        return None   # another URI is already named by the settings
    if not uri.startswith("models:/"):
        return _folder_moved(uri, committed.get("fingerprint"))
    if version is None:
        return None
    try:
        now = resolve_version(uri, config.tracking_uri)
    except RegistryError as err:
        return f"model ({uri} could not be resolved to check its version: {err})"
    if now.version == str(version):
        return _version_moved(now, committed.get("fingerprint"))
    return (f"model ({uri} was version {version} for this run, and now resolves to version "
            f"{now.version})")


def _version_moved(now: VersionInfo, fingerprint: str | None) -> str | None:
    """Why the registered version ``now``, the version number a committed run used, holds
    another predictor than that run's (``fingerprint``, its manifest's ``model.fingerprint``,
    against the version's ``document_sha256`` tag), else None; None too where either is not
    recorded (committed, or registered, before fingerprints were)."""
    from r2ray.predictor.persist import DIGEST_FIELD

    tagged = now.tags.get(DIGEST_FIELD)
    if fingerprint is None or tagged is None or tagged == fingerprint:
        return None
    return _holds_another(f"{now.uri}, its name registered again,", fingerprint, tagged)


def _folder_moved(folder: str, fingerprint: str | None) -> str | None:
    """Why ``folder`` no longer holds the predictor a committed run used (``fingerprint``, its
    manifest's ``model.fingerprint``; None: committed before it was recorded, nothing to
    compare), else None. Reads ``predictor.json`` only."""
    from r2ray.predictor.base import PredictorError
    from r2ray.predictor.persist import predictor_fingerprint, read_predictor_config

    if fingerprint is None:
        return None
    try:
        now = predictor_fingerprint(read_predictor_config(folder))
    except PredictorError as err:
        return f"model ({folder} could not be read to check it is the run's predictor: {err})"
    if now == fingerprint:
        return None
    return _holds_another(folder, fingerprint, now)


def _holds_another(model: str, then: str, now: str) -> str:
    """The warning for ``model`` holding another predictor (fingerprint ``now``) than the
    committed run used (``then``)."""
    return (f"model ({model} holds another predictor than this run used: fingerprint "
            f"{then[:12]}… then, {now[:12]}… now)")


DECISION_SETTINGS = ("input", "model", "budget_usd", "budget_per_query_usd", "spend_guarantee",
                     "catalog", "defer", "seed", "strict_budget", "cost_correction",
                     "encoder_precision")
"""Settings that change what a run decides; re-running a committed run id with others warns."""
UNRECORDED_SETTINGS = {"encoder_precision": "float32"}
"""What runs committed before a setting existed ran with (their manifests do not name it)."""


def _show(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _route_attempt(config: RouteConfig, paths: RunPaths, state: str, model: LoadedModel,
                   correction: CostCorrection | None, units: list[ReadUnit], unreadable: pa.Table, files: list[str],
                   fingerprint: str, timings: dict, lease: RunLease) -> dict:
    import ray

    from r2ray.batch.assign import assign_stage
    from r2ray.batch.dedupe import drop_rows_stage, first_seen_duplicates
    from r2ray.batch.pool import pool_shape
    from r2ray.batch.report import STATS_SCHEMA, combine_stats, percent_bound, spend_by_model
    from r2ray.batch.score import ScoreWorker
    from r2ray.bench.io import write_table
    from r2ray.predictor.spend_guarantee import plan_budget
    from r2ray.solver import InfeasibleBudget, solve_dataset
    from r2ray.solver.distributed import start_solver

    if unreadable.num_rows:
        write_table(unreadable, storage.join(paths.quarantine, "part-unreadable.parquet"))
    sources = {u.file_index: u.source for u in units}
    with _timed(timings, "start_ray"):   # joins a running cluster, or starts a local one
        _init_ray()
    max_context = max(m.context for m in model.catalog.models)
    pool = pool_shape(config, ray.cluster_resources(), model.has_text_encoder,
                      planned_rows(units), node_resources())
    cost_factors = None if correction is None else correction.factors_for(model.catalog).tolist()
    warm = warm_up_in_background(config)   # the driver only waits while the workers score
    solver = start_solver(config.defer, modules=("r2ray.batch.assign",))   # warms meanwhile
    with _timed(timings, "read_validate_score"):
        # each read task yields one call's rows at a time as it reads them (Ray Data hands them
        # on in blocks of up to its target_max_block_size, 128 MiB)
        queries = ray.data.from_items(unit_items(units) or [], override_num_blocks=max(
            1, len(units))).map_batches(
            read_stage, batch_size=1, batch_format="numpy", num_cpus=config.task_cpus,
            compute=ray.data.TaskPoolStrategy(size=pool.read_tasks),
            fn_kwargs={"quarantine_uri": paths.quarantine, "max_context_tokens": max_context,
                       "embedding_dim": model.embedding_dim,
                       "embedding_required": not model.has_text_encoder,
                       "slice_rows": pool.batch_size})
        # one call's rows per block, cut as the units stream in (big units spread over workers)
        queries = queries.repartition(target_num_rows_per_block=pool.batch_size)
        scored = queries.map_batches(
            ScoreWorker, batch_size=pool.batch_size, batch_format="pyarrow",
            **score_pool_options(pool),
            fn_constructor_kwargs={"files": model.files,
                                   "catalog_yaml": model.catalog.to_yaml(),
                                   "strict_budget": config.strict_budget,
                                   "cost_factors": cost_factors,
                                   "threads": pool.threads_per_worker,
                                   "precision": pool.encoder_precision,
                                   "label": model.label},
            ).materialize()  # Ray Data restarts lost actors and retries their tasks by default
    with _timed(timings, "deduplicate"):
        duplicates = first_seen_duplicates(scored, num_cpus=config.task_cpus)
        solvable = scored if not duplicates else scored.map_batches(
            drop_rows_stage, batch_format="pyarrow", batch_size=None, num_cpus=config.task_cpus,
            fn_kwargs={"duplicates": duplicates, "sources": sources,
                       "quarantine_uri": paths.quarantine},
        ).materialize()
        n_solvable = solvable.count()
    if n_solvable == 0 and quarantine_counts(paths.quarantine)["records"] == 0:
        raise EmptyInput(f"input {config.input} holds no queries ({len(files)} file(s), 0 rows)")
    budget_usd = total_budget_usd(config, n_solvable)
    span = None
    if (0 < config.spend_guarantee < 1 and not config.strict_budget and n_solvable > 0
            and model.spend_simulation.position is not None):   # else κ is looked up by spend
        with _timed(timings, "spend_span"):
            span = dataset_span(solvable, config.task_cpus)
    plan = plan_budget(budget_usd, n_solvable, config.spend_guarantee, model.spend_simulation,
                       strict=config.strict_budget, span=span)
    usable_usd = plan.planned_limit_usd
    certificate, stats = None, combine_stats(pa.Table.from_pylist([], schema=STATS_SCHEMA))
    if n_solvable:  # else every row was quarantined: commit that, so the night is on record
        with _timed(timings, "solve_assign_write"):
            assign = (assign_stage, {"catalog_yaml": model.catalog.to_yaml(),
                                     "cost_factors": cost_factors,
                                     "routed_uri": paths.routed, "deferred_uri": paths.deferred,
                                     "model_version": model.label, "run_id": paths.run_id,
                                     "strict_budget": config.strict_budget})
            try:
                solved = solve_dataset(solvable, usable_usd, seed=config.seed,
                                       defer=config.defer, num_cpus=config.task_cpus,
                                       then=assign, solver=solver)
            except InfeasibleBudget as err:
                strict = ", every arm at its worst case (--strict-budget)" \
                    if config.strict_budget else ""
                held = "" if plan.inflation == 1 else (
                    f" after the {percent_bound(plan.probability, upper=False)} spend guarantee "
                    f"(--spend-guarantee) held back {1 - 1 / plan.inflation:.1%}")
                raise R2RayError(f"infeasible budget: {err} (usable budget {_usd(usable_usd)}"
                                 f"{held}{strict}); nothing was committed") from None
        certificate = solved.certificate
        stats = combine_stats(pa.concat_tables([stats, *ray.get(solved.arms.to_arrow_refs())]))
    failpoint("before_commit")
    routed = int(np.sum(stats.column("queries").to_numpy()))
    deferred = n_solvable - routed   # every row the solve saw is routed or deferred, once
    check_assigned_parts(paths.routed, routed, paths.deferred, deferred)
    quarantine = quarantine_counts(paths.quarantine)
    rows_planned = footer_rows(units)
    check_rows_accounted(rows_planned, n_solvable, quarantine)
    predicted_spend = float(np.sum(stats.column("spend_usd").to_numpy(), dtype=np.float64))
    worst_case = float(np.sum(stats.column("worst_case_usd").to_numpy(), dtype=np.float64))
    manifest = {
        "run_id": paths.run_id,
        "state_before": state,
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "r2ray_version": __version__,
        "counts": {"rows_in": routed + deferred + quarantine["rows"], "routed": routed,
                   "quarantined": quarantine["rows"], "duplicates": quarantine["duplicates"],
                   "deferred": deferred, "unreadable_files": quarantine["files"],
                   "unread_rows": quarantine["unread_rows"], "rows_planned": rows_planned},
        "spend": {"budget_usd": budget_usd, "usable_usd": usable_usd,
                  "predicted_usd": predicted_spend, "worst_case_usd": worst_case,
                  "strict_budget": config.strict_budget,
                  "guarantee": guarantee_record(plan, certificate, predicted_spend),
                  "cost_correction": correction_record(correction, config),
                  "by_model": spend_by_model(stats)},
        "solve": None if certificate is None else _solve_record(certificate, solved.in_memory),
        "model": {"uri": model.uri, "name": model.name, "version": model.version,
                  "label": model.label, "fingerprint": model.fingerprint},
        "catalog_fingerprint": model.catalog.fingerprint,
        "input": {"uri": config.input, "files": len(files), "fingerprint": fingerprint,
                  "rows_check": rows_check_words(units)},
        "output": {"routed": paths.routed, "quarantine": paths.quarantine,
                   "deferred": paths.deferred},
        "timings": timings,
        "scoring_pool": pool.to_json(),   # the config's open settings resolved on this cluster
        "config": config.model_dump(),
    }
    return _report_and_commit(config, paths, manifest, stats, warm, timings, lease)


def _report_and_commit(config: RouteConfig, paths: RunPaths, manifest: dict, stats: pa.Table,
                       warm, timings: dict, lease: RunLease) -> dict:
    """Write the report (report.md, spend.png, the MLflow run), then commit the manifest: each
    only while this run still holds its lease. Checked only before the commit, a run whose lease
    went unrenewed (a stall, a storage outage) and was taken over logged an MLflow run (and wrote
    a report) for a night it never committed, beside the new holder's."""
    from r2ray.batch.report import log_to_mlflow, spend_plot_or_none, write_report

    lease.renew()   # LeaseLost where another run took this one's lease over: report nothing
    with _timed(timings, "report"):   # recorded in manifest.json, after report.md is written
        warm.join(timeout=WARM_UP_WAIT_S)   # else the report does what is left itself
        plot = spend_plot_or_none(stats)
        manifest["artifacts"] = write_report(paths.path(), manifest, stats, plot)
        manifest["mlflow_run_id"] = _log_report(manifest, stats, config.tracking_uri,
                                                functools.partial(log_to_mlflow, plot_png=plot))
    try:
        lease.renew()   # LeaseLost where another run took this one's lease over: never commit then
        write_manifest(paths, manifest)
    except BaseException as err:
        if manifest["mlflow_run_id"] is not None:
            _mark_uncommitted(manifest["mlflow_run_id"], config.tracking_uri, err)
        raise
    drop_superseded(paths)   # committed: a stop (SIGTERM) or an error here leaves its MLflow run be
    return manifest


def _mark_uncommitted(mlflow_run_id: str, tracking_uri: str | None, err: BaseException) -> None:
    """The MLflow run logged for a night that then did not commit (its lease lost, the manifest
    unwritten) ends FAILED, tagged with why: left FINISHED, it showed operators the counts and
    spend of routed output no consumer will ever read. A tracking failure here only warns."""
    from r2ray.registry import configure_tracking, mlflow_guard

    try:
        with mlflow_guard():
            import mlflow

            client = mlflow.MlflowClient(configure_tracking(tracking_uri))
            client.set_tag(mlflow_run_id, "r2ray.not_committed",
                           redact_text(f"{type(err).__name__}: {err}")[:500])
            client.set_terminated(mlflow_run_id, status="FAILED")
    except Exception as failure:  # noqa: BLE001 — the run's own error is the one to raise
        print(f"warning: could not mark MLflow run {mlflow_run_id} as not committed "
              f"({type(failure).__name__}: {redact_text(str(failure))})", file=sys.stderr)


def dataset_span(dataset, num_cpus: float):
    """The :class:`~r2ray.predictor.spend_guarantee.BacklogSpan` of a Dataset of step tables:
    each block's sums where it lives (this node's blocks read in place, no task), added here."""
    import ray

    from r2ray.predictor.spend_guarantee import BacklogSpan
    from r2ray.solver.distributed import blocks_in_place

    parts = blocks_in_place(dataset.to_arrow_refs(), block_span, num_cpus=num_cpus)
    return sum((ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in parts),
               BacklogSpan(0.0, 0.0))


def block_span(table: pa.Table):
    from r2ray.predictor.spend_guarantee import span_of_steps
    from r2ray.solver.table import table_to_steps

    return span_of_steps(table_to_steps(table)[0])


WARM_UP_WAIT_S = 60.0   # the longest the report stage waits for the warm-up thread


def in_background(name: str, *steps) -> threading.Thread:
    """Run ``steps`` (callables) one after the other in a daemon thread: what a later stage needs
    on first use in this process, loaded while the driver would otherwise wait. A failure only
    means the stage does it itself (and reports any error there)."""
    def run() -> None:
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 — see the docstring
                pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def warm_up_in_background(config: RouteConfig) -> threading.Thread:
    """While the workers score: the report's imports and MLflow store
    (:func:`r2ray.batch.report.prepare_report`), seconds on a 2-core host that the driver
    would otherwise spend after the workers finish (the solve warms in its own process:
    :class:`~r2ray.solver.distributed.SolveWorker`)."""
    def report() -> None:
        from r2ray.batch.report import prepare_report
        prepare_report(config.tracking_uri)

    return in_background("r2ray-warm-up", report)


def find_correction(config: RouteConfig, model: LoadedModel) -> CostCorrection | None:
    """The newest per-arm cost correction ``r2ray reconcile`` wrote under this output root for
    this model version and predictor (by its fingerprint) and catalogue (None: none, or
    ``--no-cost-correction``)."""
    if not config.cost_correction:
        return None
    from r2ray.reconcile.correction import latest_correction

    return latest_correction(config.output, model.label, model.catalog.fingerprint,
                             model.fingerprint)


def correction_record(correction: CostCorrection | None, config: RouteConfig) -> dict:
    """The manifest's ``spend.cost_correction``: which reconciliation's factors priced ĉ
    (``c_hat_usd`` and ``predicted_usd``; ``applied`` tells ``r2ray reconcile`` to divide them
    out), and ``priced_solve``: whether they priced the costs the solve spent too. Not with
    ``--strict-budget``: it spends each arm's worst case at its cap, which they do not change."""
    if correction is None:
        return {"applied": False, "reason": "turned off (--no-cost-correction)"
                if not config.cost_correction else "no reconciliation for this model yet"}
    return {"applied": True, "priced_solve": not config.strict_budget,
            "version": correction.version,
            "source_run_id": correction.source_run_id, "rows": correction.rows,
            "overall": correction.overall, "created_at": correction.created_at}


def guarantee_record(plan: SpendPlan, certificate, predicted_usd: float) -> dict:
    """The manifest's ``spend.guarantee``: the bound promised, how it was sized, what it cost.

    ``quality_given_up_at_most`` (Σ q̂) bounds what planning under ``usable_usd`` instead of the
    whole budget lost: the dual value at λ* plus λ* × the money held back is an upper bound on
    the best plan for the whole budget (the LP value is concave in the budget, λ* a supergradient)."""
    record = plan.to_json()
    sized = 0 < plan.probability < 1   # 0: no guarantee; 1: the strict budget's certainty
    record["expected_realised_usd"] = predicted_usd * plan.expected_ratio if sized else None
    if not math.isfinite(plan.expected_ratio):   # NaN without a guarantee: not JSON (RFC 8259)
        record["expected_realised_over_planned"] = None
    if certificate is not None:
        held_back = plan.budget_usd - plan.planned_limit_usd
        given_up = certificate.gap + certificate.lam * held_back
        record["quality_given_up_at_most"] = given_up
        # a share of nothing kept (every row deferred: objective 0) has no meaning: None
        record["quality_given_up_share_at_most"] = \
            given_up / certificate.objective if certificate.objective > 0 else None
    return record


def _solve_record(certificate, in_memory: bool) -> dict:
    """The certificate, and where it was solved: in memory in one SolveWorker, or by the
    distributed passes (past the size limit, or after the solver was lost: its warning says)."""
    return {"path": "in memory" if in_memory else "distributed passes",
            "lambda": certificate.lam, "theta": certificate.theta,
            "tie_cut": certificate.tie_cut, "seed": certificate.seed,
            "objective": certificate.objective, "lp_value": certificate.lp_value,
            "upper_bound": certificate.upper_bound, "gap": certificate.gap,
            "steps": certificate.n_steps, "steps_taken": certificate.n_steps_taken,
            "filled": certificate.n_filled, "invalid_arms": certificate.n_invalid_arms}


def _guarantee_words(guarantee: dict | None) -> str:
    if not guarantee or guarantee["probability"] in (0, 1):
        return "" if not guarantee else (", no spend guarantee" if guarantee["probability"] == 0
                                         else "")
    from r2ray.batch.report import percent_bound

    given_up = guarantee.get("quality_given_up_share_at_most")
    return (f"; realised ≤ budget with p ≥ {percent_bound(guarantee['probability'], upper=False)}"
            f": planned 1/{guarantee['inflation']:.4f} of it"
            + ("" if given_up is None else
               f", quality given up ≤ {percent_bound(given_up, upper=True)}"))


def _usd(value: float) -> str:
    """Money for people (:func:`r2ray.batch.report.usd_digits`): the cents kept, whatever the
    magnitude ($12345.67, $0.399998, $1e+300)."""
    from r2ray.batch.report import usd_digits

    return f"${usd_digits(value)}"


def _unread_words(counts: dict) -> str:
    """The rows the unreadable files left unread, where their footers count them: they are in
    no other count, ``rows_in`` included (older committed runs lack the key)."""
    unread = counts.get("unread_rows", 0)
    return f" ({unread:,} rows in them not read, not in the counts)" if unread else ""


def summarise_manifest(manifest: dict) -> str:
    """A few lines for the terminal: where the run is, what it routed, what it spent."""
    from r2ray.batch.report import correction_lines

    counts, spend, solve = manifest["counts"], manifest["spend"], manifest["solve"]
    lines = [
        f"run {manifest['run_id']} committed at {manifest['committed_at']} "
        f"({manifest['output']['routed'].rsplit('/routed', 1)[0]})",
        f"  queries: {counts['rows_in']:,} in, {counts['routed']:,} routed, "
        f"{counts['quarantined']:,} quarantined ({counts['duplicates']:,} duplicates), "
        f"{counts['deferred']:,} deferred, {counts['unreadable_files']} unreadable file(s)"
        + _unread_words(counts),
        f"  spend: predicted {_usd(spend['predicted_usd'])} of {_usd(spend['usable_usd'])} "
        f"usable (budget {_usd(spend['budget_usd'])}{_guarantee_words(spend.get('guarantee'))})"
        + ("" if "worst_case_usd" not in spend else  # older committed runs lack it
           f", worst case at the caps {_usd(spend['worst_case_usd'])}"
           + (" (strict budget)" if spend.get("strict_budget") else "")),
        *("  " + line for line in correction_lines(spend.get("cost_correction"))),
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
