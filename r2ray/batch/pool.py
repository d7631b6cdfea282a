"""The scoring actor pool's shape: how many workers, their CPUs, GPUs and torch threads, and the
rows per call, from the cluster's resources where the config leaves them open.

Why these defaults (measured on 2 busy cores, ``benchmarks/batch.py``):

- one torch thread per worker and one worker per CPU: the encoder and the predictor run small
  batches, where a second intra-op thread adds little and, on a loaded host, spin-waits; separate
  processes scale with the cores instead;
- each worker asks for (CPUs − 1 per node) ÷ workers CPUs (none below two CPUs), so the tasks
  that feed the pool still find room (:func:`repartition_reserve`): Ray Data's repartition tasks
  ask for a whole CPU, and with 1.75 of 2 CPUs held by actors the job hung (as it did on 1 CPU
  with 0.5 held, and on two 2-CPU nodes with 0.5 free on each); the CPUs are logical, the
  threads are what runs, so the actors' torch threads are set explicitly, not left to Ray's
  ``OMP_NUM_THREADS`` guess (the CPUs held, rounded down: no more threads than those).
  Settings that leave no such room, or ask for more GPUs than the cluster has now, are warned
  of (:func:`shortfall`): Ray waits for them, until an autoscaler or joining workers bring them,
  on a fixed cluster forever (none visible: one GPU worker, for the autoscaler to make room for);
- with ``gpus_per_worker``, one worker per GPU share it asks for;
- rows per call: thousands of precomputed embeddings (the call overhead dominates); for texts,
  about ``CALLS_PER_WORKER`` calls per worker over the backlog, within ``TEXT_BATCH_LIMITS``: the
  encoder sorts each call's texts by length, so larger calls pad less (20,000 texts, 2 workers:
  256 per call ran the job's encoder pass at 0.71 of the in-process encoder, 1,024 at 0.85),
  while a small backlog still spreads over the workers as they start (1,000 texts: 256);
- read tasks at once: one per ``WORKERS_PER_READ_TASK`` workers. One read task reads and
  validates ~100,000 precomputed-embedding rows a second, a worker scores ~7,000 (texts: ~50), so
  one task keeps many workers fed; and every read task running at once is a worker process that
  starts and imports while the actors load the model: 200,000 embedding rows from one file of
  four row groups on a running 2-CPU cluster, four reads at once put the actors' first call at
  ~12.7 s and the score stage at 29.9 s, one read at a time at ~5.5-7.7 s and 20.8-23.2 s;
- a read task yields one call's rows at a time as it reads a unit (``backlog.read_stage``), and
  the output is cut into blocks of one call's rows as it streams (Ray Data's streaming
  repartition), so the workers start before a large unit is read through (200,000 embedding
  rows in one row group, running 2-CPU cluster: 20.1 s end to end against 26.8 s when a unit left
  its read task whole; Ray Data still merges what a task yields into blocks of up to 128 MiB:
  8 MiB blocks made 1,000,000 rows take minutes instead of 63 s);
- calls queued per actor (Ray Data's ``max_tasks_in_flight_per_actor``): one for texts, since a
  text call runs for seconds, so a second one queued behind it saves no wait while it can leave
  one worker idle at the end with the other's queued block still to do (4,000 texts, load 3.5,
  one run: the idle tail 1.9 s with two, 0.7 s with one; actor pass 61.6 vs 66.1 texts/s); Ray
  Data's own default (two) for embeddings, whose calls are short enough for the fetch to matter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from r2ray.encoders import resolve_precision

log = logging.getLogger(__name__)

REPARTITION_CPUS = 1.0         # CPUs a Ray Data repartition task asks for beside the actors
TEXT_BATCH_ROWS = 256          # texts per actor call when the backlog's size is unknown
TEXT_BATCH_LIMITS = (256, 2048)  # texts per actor call sized from the backlog
CALLS_PER_WORKER = 8           # text calls per worker a sized backlog is cut into
EMBEDDING_BATCH_ROWS = 8192    # rows per actor call when every row carries its embedding
TEXT_CALLS_IN_FLIGHT = 1       # text calls queued on each actor (the one it runs included)
EMBEDDING_CALLS_IN_FLIGHT = 2  # embedding calls queued on each actor: Ray Data's default
WORKERS_PER_READ_TASK = 8      # scoring workers one concurrent read task feeds


@dataclass(frozen=True)
class PoolShape:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads_per_worker: int    # torch intra-op threads in each worker
    batch_size: int            # rows per actor call
    calls_in_flight: int = EMBEDDING_CALLS_IN_FLIGHT   # calls queued on each actor
    read_tasks: int = 1        # read tasks running at once
    encoder_precision: str | None = None  # the text encoder's forward pass, one for the run
                                          # (None: the model has no text encoder)

    def to_json(self) -> dict:
        return asdict(self)


def pool_shape(config, cluster: dict[str, float], encodes_text: bool,
               backlog_rows: int | None = None,
               nodes: list[dict[str, float]] | None = None) -> PoolShape:
    """The pool for ``config`` (a :class:`~r2ray.batch.config.RouteConfig`; its ``workers``,
    ``cpus_per_worker``, ``threads_per_worker``, ``batch_size`` and ``read_tasks`` win where
    given) on a cluster with ``cluster`` resources (``ray.cluster_resources()``: ``CPU``,
    ``GPU`` totals; no ``CPU`` key: none) on ``nodes`` (each live node's resources,
    :func:`r2ray.cluster.node_resources`; None: one node).
    ``encodes_text``: the workers embed text (else rows carry embeddings); ``backlog_rows``: the
    rows planning counted (None: unknown), which size the text calls."""
    cpus = float(cluster.get("CPU", 0.0))
    gpus = config.gpus_per_worker
    free_cpus = max(0.0, cpus - repartition_reserve(nodes))   # room for the feeding tasks
    if config.workers is not None:
        workers = config.workers
    elif gpus > 0:   # the epsilon: 1 // 0.2 is 4.0 in floats, and five 0.2 shares fit one GPU
        workers = max(1, math.floor(float(cluster.get("GPU", 0.0)) / gpus + 1e-9))
    else:
        workers = max(1, math.floor(cpus))
    per_worker = config.cpus_per_worker or math.floor(1000 * free_cpus / workers) / 1000
    if gpus > 0 and config.cpus_per_worker is None:
        per_worker = min(per_worker, 1.0)   # a GPU worker needs one core to feed it
    threads = config.threads_per_worker or max(1, math.floor(per_worker + 1e-9))
    rows = config.batch_size or (text_batch_rows(backlog_rows, workers) if encodes_text
                                 else EMBEDDING_BATCH_ROWS)
    in_flight = TEXT_CALLS_IN_FLIGHT if encodes_text else EMBEDDING_CALLS_IN_FLIGHT
    reads = config.read_tasks or math.ceil(workers / WORKERS_PER_READ_TASK)
    pool = PoolShape(workers, per_worker, gpus, threads, rows, in_flight, reads,
                     encoder_precision(config.encoder_precision, gpus > 0) if encodes_text
                     else None)
    short = shortfall(pool, cpus, float(cluster.get("GPU", 0.0)), repartition_reserve(nodes))
    if short:
        log.warning("%s: the job waits until the cluster has them (an autoscaler, workers "
                    "still joining), on a cluster of fixed size forever", short)
    return pool


def repartition_reserve(nodes: list[dict[str, float]] | None) -> float:
    """CPUs the default pool leaves free so a whole-CPU repartition task finds one node to run
    on: ``REPARTITION_CPUS`` on each node that can hold one (at least one node). Free CPUs
    summing to one whole CPU can be split over nodes, none of which then has it (two 2-CPU
    nodes, four workers of 0.75: 0.5 free on each, and the job hung); one per node leaves some
    node a whole one however the actors are placed, as the free CPUs sum to the node count."""
    big = sum(1 for node in nodes or () if node.get("CPU", 0.0) >= REPARTITION_CPUS - 1e-9)
    return REPARTITION_CPUS * max(1, big)


def shortfall(pool: PoolShape, cpus: float, gpus: float,
              reserve: float = REPARTITION_CPUS) -> str | None:
    """What the pool asks for that the cluster (``cpus``, ``gpus``: its totals now) lacks beside
    ``reserve`` CPUs for repartition tasks (:func:`repartition_reserve`), else None. Ray Data
    does not fail on it: it waits until the cluster has it (an autoscaler adding nodes, workers
    still joining), on a fixed cluster forever; so the job warns, naming the setting, rather
    than refusing a cluster about to grow."""
    held_cpus, held_gpus = pool.workers * pool.cpus_per_worker, pool.workers * pool.gpus_per_worker
    if held_gpus > gpus + 1e-9:
        return (f"the scoring pool asks for {held_gpus:g} GPUs ({pool.workers} workers × "
                f"gpus_per_worker {pool.gpus_per_worker:g}); the cluster has {gpus:g} now")
    if held_cpus + reserve > max(cpus, reserve) + 1e-9:
        return (f"the scoring pool asks for {held_cpus:g} CPUs ({pool.workers} workers × "
                f"cpus_per_worker {pool.cpus_per_worker:g}); the cluster has {cpus:g} now and Ray "
                f"Data's repartition needs {reserve:g} beside them ({REPARTITION_CPUS:g} per "
                f"node): give at most {max(0.0, cpus - reserve) / pool.workers:.3g} per worker, "
                "or leave cpus_per_worker unset")
    if cpus < REPARTITION_CPUS:
        return (f"the cluster has {cpus:g} CPUs now; the batch job needs at least "
                f"{REPARTITION_CPUS:g} (Ray Data's repartition task asks for a whole one)")
    return None


def encoder_precision(asked: str, on_gpus: bool) -> str:
    """The precision every worker's encoder runs: ``auto`` resolved here, from this node's CPU
    (:func:`r2ray.encoders.resolve_precision`), so one run never mixes precisions across nodes
    and the manifest (``scoring_pool``) says which ran; a worker without native bf16 still runs
    bfloat16, only slower. A GPU pool's ``auto`` stays for each worker to resolve on its GPU
    (the driver need not see one, nor import torch)."""
    return asked if on_gpus or asked != "auto" else resolve_precision(asked, "cpu")


def text_batch_rows(backlog_rows: int | None, workers: int) -> int:
    """Texts per actor call: the power of two nearest ``backlog_rows`` ÷ (workers ×
    ``CALLS_PER_WORKER``) within ``TEXT_BATCH_LIMITS``; ``TEXT_BATCH_ROWS`` when unknown."""
    if not backlog_rows:
        return TEXT_BATCH_ROWS
    share = max(1.0, backlog_rows / (workers * CALLS_PER_WORKER))
    return int(np.clip(2 ** round(math.log2(share)), *TEXT_BATCH_LIMITS))
