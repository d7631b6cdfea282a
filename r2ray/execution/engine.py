"""The execution engine: request rows → (Ray Data, async HTTP per endpoint) → result parts.

Work folder layout::

    parts/part-<hash>.parquet      answered requests (RESULT_SCHEMA), one file per finished batch
    failures/part-<hash>.parquet   requests that got no usable answer, the reason in ``error``
    billed/part-<hash>.parquet     earlier runs' failures the provider billed (``billed_usd`` > 0):
                                   kept when ``failures/`` is cleared, counted in every later
                                   run's spend and cap
    manifest.json                  written LAST by the caller (collect, execute)

Crash safety: a part is written whole (temp name + rename) once its batch is done and is named by
its keys and prompt hashes, so a kill loses at most the batches in flight. A Ctrl-C or SIGTERM is
no kill (:class:`StopOnSignal`): the first issues no new call and waits for the calls in flight,
at most the calls' timeout (``RetryPolicy.timeout_s``, ``--timeout-s``), writes their answers and
cost as any, books a call still out then at its worst case, and stops; a second stops at once,
calls in flight maybe billed unrecorded. A rerun reads the
parts, runs only the keys not answered (last run's failures included: they are cleared at the
start and retried), and the final table keeps one row per key. A failure is never a quality-0
row: it has no answer.

A part answers a request only if it records the same ``prompt_sha`` (the messages and
``max_tokens`` sent) and model (a judge's key names the answer judged, not the judge: another
``--judge-model`` in the same work folder is asked again), so a query edited under the same id is
sent again (what its first answer was billed stays in the spend and the cap: it was paid). Parts
written before the hash was recorded (null ``prompt_sha``) cannot be checked: by default each is
reused once, for a key with no recorded row and the same ``max_tokens`` and model, stamped with
the prompt sent now (a warning gives the count), so the calls they paid for are not paid again;
``unrecorded="resend"`` sends them again instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from r2ray import storage
from r2ray.batch.report import usd_digits
from r2ray.catalog import Catalog
from r2ray.errors import stopped_by
from r2ray.execution.client import (RESULT_SCHEMA, SPEND_BOOK_FAILED, EndpointLimiter,
                                    EndpointSettings, RunStopped, SpendBookError, chat_url,
                                    execute_one)
from r2ray.execution.policy import RetryPolicy, SpendBook, plan_todo
from r2ray.execution.requests import RequestError, worst_case_usd
from r2ray.redaction import redact_uri

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 4   # requests in flight per endpoint when the catalogue sets none


@dataclass(frozen=True)
class EngineConfig:
    """How to run: Ray or in-process, workers, batch size, retries, the spend cap (USD)."""

    executor: str = "ray"            # "ray" (Ray Data actor pool) or "local" (this process)
    workers: int = 1                 # Ray actors; the catalogue's limits are shared among them
    cpus_per_worker: float = 0.25    # workers mostly wait on the network
    batch_rows: int = 8              # requests per part: what a kill can lose
    max_spend_usd: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    seed: int = 0                    # backoff jitter
    progress_every_s: float = 10.0
    unrecorded: str = "reuse"        # parts with no prompt hash: "reuse" (unchecked) or "resend"


def endpoint_settings(catalog: Catalog, models: list[str], workers: int) -> dict:
    """{model: EndpointSettings} with the catalogue's limits divided among ``workers``."""
    out = {}
    for name in models:
        spec = catalog.model(name)
        share = max(1, workers)
        out[name] = EndpointSettings(
            url=chat_url(spec.endpoint), api_key_env=spec.api_key_env,
            max_concurrency=max(1, (spec.max_concurrency or DEFAULT_CONCURRENCY) // share),
            requests_per_minute=None if spec.requests_per_minute is None
            else spec.requests_per_minute / share,
            tokens_per_minute=None if spec.tokens_per_minute is None
            else spec.tokens_per_minute / share)
    return out


def _booking(method):
    """A book's method whose every exception is a :class:`SpendBookError`, which
    :func:`execute_one` records on the row rather than losing the batch to it; a closed book's
    refusal is :class:`RunStopped` (the call not made: nothing failed here)."""
    @functools.wraps(method)
    async def booked(*args):
        try:
            return await method(*args)
        except Exception as err:
            if RunStopped.closed(err):
                raise RunStopped() from err
            raise SpendBookError.raised(err) from err
    return booked


class _LocalBook:
    def __init__(self, book: SpendBook):
        self.book = book

    @_booking
    async def reserve(self, worst_usd: float) -> bool:
        return self.book.reserve(worst_usd)

    @_booking
    async def settle(self, worst_usd: float, cost_usd: float) -> None:
        self.book.settle(worst_usd, cost_usd)


class _ActorBook:
    def __init__(self, actor):
        self.actor = actor

    @_booking
    async def reserve(self, worst_usd: float) -> bool:
        return await self.actor.reserve.remote(worst_usd)

    @_booking
    async def settle(self, worst_usd: float, cost_usd: float) -> None:
        await self.actor.settle.remote(worst_usd, cost_usd)


UNRECORDED_NOTE = "stopped at once: calls in flight may be billed and not recorded"
"""What a second Ctrl-C or SIGTERM says (the CLI prints it): the calls in flight were not waited
for, so what the provider bills for them is in no part and no spend."""


class StopOnSignal:
    """While a run's calls go out, SIGINT (Ctrl-C) and SIGTERM stop it without losing the calls
    in flight, which the provider bills: the first sets :attr:`signum` and calls each listener
    (a worker closes its limiters, so no new call is made) and the run writes what comes back,
    then :meth:`raise_if_stopped` raises as the CLI expects (:class:`KeyboardInterrupt`, or
    :class:`~r2ray.errors.Terminated`); a second raises at once with :data:`UNRECORDED_NOTE`.
    Listeners run inside the signal handler: plain flags and ``call_soon_threadsafe`` only, no
    lock (the interrupted code may hold it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.listeners: list[Callable[[], None]] = []

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise self.stop(signum, UNRECORDED_NOTE)
        self.signum = signum
        for listener in self.listeners:
            listener()

    @staticmethod
    def stop(signum: int, note: str = "") -> KeyboardInterrupt:
        err = stopped_by(signum)
        err.note = note
        return err

    def raise_if_stopped(self) -> None:
        if self.signum is not None:
            raise self.stop(self.signum)

    @classmethod
    @contextlib.contextmanager
    def installed(cls):
        """A :class:`StopOnSignal` handling SIGINT and SIGTERM for the block (main thread only,
        the one a handler may be set from; a signal ignored, as in a ``nohup`` job, stays so);
        the previous handlers are restored after."""
        stop = cls()
        if threading.current_thread() is not threading.main_thread():
            yield stop
            return
        previous = {signum: signal.getsignal(signum) for signum in cls.SIGNALS}
        for signum, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(signum, stop)
        try:
            yield stop
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class SpendLedger(SpendBook):
    """The one :class:`SpendBook` of a run, as a Ray actor the workers share."""

    def __init__(self, cap_usd: float | None, realised_usd: float):
        super().__init__(cap_usd=cap_usd, realised_usd=realised_usd)


class RequestWorker:
    """Ray Data callable class: a batch of request rows (Arrow) → its result rows. Keeps one event
    loop, one HTTP client and one limiter per endpoint across batches."""

    def __init__(self, settings: dict, retry: dict, ledger=None, book: SpendBook | None = None,
                 seed: int = 0):
        self.settings = {m: EndpointSettings(**s) for m, s in settings.items()}
        self.retry = RetryPolicy(**retry)
        self.book = _ActorBook(ledger) if ledger is not None else _LocalBook(book or SpendBook())
        self.rng = random.Random(seed ^ os.getpid())
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        self._limiters: dict[str, EndpointLimiter] = {}
        self._stopping = False
        self._woken: asyncio.Event | None = None   # set when the run stops mid-batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._loop.run_until_complete(self._run(batch.to_pylist()))

    def stop(self) -> None:
        """The run is stopping (a :class:`StopOnSignal` listener): no new call from now on, the
        batch's calls in flight waited for (:meth:`_wait`). Flags and a thread-safe wake only."""
        self._stopping = True
        for limiter in list(self._limiters.values()):
            limiter.closed = True
        if self._woken is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._woken.set)

    async def _run(self, requests: list[dict]) -> pa.Table:
        if self._client is None:
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256))
        for request in requests:
            url = self.settings[request["model"]].url
            if url not in self._limiters:
                self._limiters[url] = EndpointLimiter(self.settings[request["model"]])
                self._limiters[url].closed = self._stopping
        self._woken = asyncio.Event()
        calls = [asyncio.ensure_future(execute_one(
            self._client, r, self.settings[r["model"]], self._limiters[self.settings[r["model"]].url],
            self.retry, self.book, self.rng)) for r in requests]
        await self._wait(calls)
        return pa.Table.from_pylist([call.result() for call in calls], schema=RESULT_SCHEMA)

    async def _wait(self, calls: list[asyncio.Future]) -> None:
        """Until every call is back; once the run stops (:meth:`stop`), at most the calls' own
        timeout (``RetryPolicy.timeout_s``) more, then those still out are cancelled, each row
        booked at its worst case if its call had gone out (:data:`CUT_OFF`)."""
        everything = asyncio.gather(*calls)
        woken = asyncio.ensure_future(self._woken.wait())
        await asyncio.wait([everything, woken], return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        if not everything.done():
            _, late = await asyncio.wait(calls, timeout=self.retry.timeout_s)
            for call in late:
                call.cancel()
        await everything

    def close(self) -> None:
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


# ---- the work folder ---------------------------------------------------------------------------
def _part_name(keys: list[str]) -> str:
    return "part-" + hashlib.blake2b("\n".join(sorted(keys)).encode(),
                                     digest_size=10).hexdigest() + ".parquet"


def _write(table: pa.Table, folder: str, names: list[str] | None = None) -> None:
    """``table`` as one part, named by its keys, prompt hashes and models (or ``names``): the
    same batch sent again after a crash rewrites its part, but the answers to a prompt since
    edited (or from another judge model) are not overwritten by the new ones, so what they were
    billed stays on record."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    if names is None:
        names = [f"{key}@{sha}@{model}" for key, sha, model in zip(
            table["key"].to_pylist(), table["prompt_sha"].to_pylist(), table["model"].to_pylist())]
    storage.write_bytes(storage.join(folder, _part_name(names)), sink.getvalue().to_pybytes())


def keep_billed_failures(work_dir: str) -> None:
    """Move last run's failures the provider billed (it sent usage with an unreadable answer) to
    ``billed/`` before ``failures/`` is cleared for the retry, so what was paid stays in every
    later run's spend and cap. A part is named by its rows' keys and start times: run again after
    a crash here, the same rows rewrite the same part; a key billed again later adds its own."""
    failed = read_parts(storage.join(work_dir, "failures"))
    billed = failed.filter(pc.greater(failed["billed_usd"], 0.0))
    if billed.num_rows:
        _write(billed, storage.join(work_dir, "billed"), [
            f"{key}@{started!r}" for key, started in zip(billed["key"].to_pylist(),
                                                         billed["started_s"].to_pylist())])


def read_parts(folder: str) -> pa.Table:
    """Every result row under ``folder`` (RESULT_SCHEMA), or an empty table."""
    if not storage.exists(folder):
        return RESULT_SCHEMA.empty_table()
    fs, _ = storage.filesystem(folder)
    try:
        files = storage.list_files(folder, (".parquet",))
    except FileNotFoundError:   # an empty folder
        return RESULT_SCHEMA.empty_table()
    tables = []
    for uri in files:
        with fs.open(storage.filesystem(uri)[1], "rb") as handle:
            tables.append(_conform(pq.read_table(handle)))
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def _conform(part: pa.Table) -> pa.Table:
    """A part as RESULT_SCHEMA; one written before ``prompt_sha`` was recorded gets nulls there.
    A row with no ``billed_usd`` (written before it was recorded) was billed its ``cost_usd``:
    unreadable answers were not kept then."""
    if "prompt_sha" not in part.column_names:
        part = part.append_column("prompt_sha", pa.nulls(part.num_rows, pa.string()))
    if "billed_usd" not in part.column_names:
        part = part.append_column("billed_usd", pa.nulls(part.num_rows, pa.float64()))
    part = part.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    return part.set_column(RESULT_SCHEMA.get_field_index("billed_usd"), "billed_usd",
                           pc.coalesce(part["billed_usd"], part["cost_usd"]))


def check_unique_keys(requests: pa.Table) -> None:
    """Refuse requests that repeat a key: each row would be sent and paid, while the results (one
    row per key, :func:`first_per_key`) show one call. Named by the first repeated key and what
    it asks (purpose, query, model, budget) and its 1-based request rows."""
    keys = requests.column("key").to_pylist()
    seen: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key in seen:
            first = requests.slice(seen[key], 1).to_pylist()[0]
            raise RequestError(
                f"request rows {seen[key] + 1} and {row + 1} repeat key {key} ({first['purpose']} "
                f"of query {first['query_id']!r} by {first['model']!r} at budget "
                f"{first['budget']}): both would be sent and paid, the results would keep one; "
                "give each (query, model, budget) once")
        seen[key] = row


def first_per_key(results: pa.Table) -> tuple[pa.Table, int]:
    """One row per key (the first), and how many repeats were dropped."""
    if results.num_rows == 0:
        return results, 0
    _, first = np.unique(np.asarray(results.column("key").to_pylist(), dtype=object),
                         return_index=True)
    first = np.sort(first)
    return results.take(pa.array(first)), results.num_rows - len(first)


# ---- the run -----------------------------------------------------------------------------------
@dataclass
class EngineRun:
    """What one run did: counts, spend (USD), timings and the results read back from the parts."""

    results: pa.Table                 # answered, one row per key (every run so far)
    failures: pa.Table                # not answered in this run, a reason each
    calls_planned: int
    calls_done_before: int
    duplicates_dropped: int
    spend: dict
    wall_s: float
    unrecorded_reused: int = 0        # answers from parts with no prompt hash, reused unchecked
    throughput: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("results"), out.pop("failures")
        out.update(answered=self.results.num_rows, failed=self.failures.num_rows,
                   failure_reasons=failure_reasons(self.failures))
        return out


def failure_reasons(failures: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in failures.column("error").to_pylist():
        head = (reason or "").split(":")[0] if reason and reason.startswith("HTTP") else reason
        counts[head] = counts.get(head, 0) + 1
    return counts


def throughput_by_endpoint(results: pa.Table) -> dict[str, dict]:
    """Per endpoint: calls answered, calls/s and output tokens/s over its busy span."""
    out = {}
    for endpoint in sorted(set(results.column("endpoint").to_pylist())):
        rows = results.filter(pc.equal(results["endpoint"], endpoint))
        span = max(1e-9, pc.max(rows["ended_s"]).as_py() - pc.min(rows["started_s"]).as_py())
        tokens = pc.sum(rows["output_tokens"]).as_py() or 0
        out[endpoint] = {"calls": rows.num_rows, "span_s": round(span, 2),
                         "calls_per_s": round(rows.num_rows / span, 3),
                         "output_tokens_per_s": round(tokens / span, 2)}
    return out


def _sent(table: pa.Table) -> pa.ChunkedArray:
    """key + prompt hash + model of each row: what was (or is to be) sent, and to which model (a
    judge's key is the judged answer's, the same for every judge); null where no hash is
    recorded."""
    return pc.binary_join_element_wise(table["key"], table["prompt_sha"], table["model"], "\x1f")


def _requested(results: pa.Table, requests: pa.Table) -> pa.Table:
    """Only the rows that answer a request of this run as it is sent now (same key, prompt hash
    and model): parts of other requests (a query since removed, another run's rows in a reused work
    folder) and parts sent with a prompt since edited are no results of this one."""
    return results.filter(pc.fill_null(
        pc.is_in(_sent(results), value_set=_sent(requests).combine_chunks()), False))


def _paid(parts: pa.Table) -> float:
    """USD billed for every answered row in ``parts``, whatever its key or prompt: an answer to a
    prompt since edited under the same id, or to a query since removed, is no result of this run,
    but it was paid into this output, so it stays in the spend and the cap (as billed/ failures
    do). A row adopted from a part with no prompt hash is in parts/ twice (as first written, and
    stamped): it is counted once (:func:`_billed`)."""
    return _billed(parts)


def unrecorded_matches(results: pa.Table, requests: pa.Table) -> pa.Table:
    """Rows of parts written before the prompt hash was recorded that may answer a request: the
    same key, ``max_tokens`` and model, and no recorded row of that key (one means the key was
    sent since, so the unrecorded row is older). One per key, stamped with the request's hash.
    Their messages were not stored, so whether the prompt changed cannot be checked."""
    legacy = results.filter(pc.is_null(results["prompt_sha"]))
    if legacy.num_rows == 0:
        return legacy
    recorded = set(results.filter(pc.is_valid(results["prompt_sha"]))["key"].to_pylist())
    wanted = {k: (sha, (cap, model)) for k, sha, cap, model in zip(
        requests["key"].to_pylist(), requests["prompt_sha"].to_pylist(),
        requests["max_tokens"].to_pylist(), requests["model"].to_pylist())}
    keep, shas = [], []
    for i, sent in enumerate(zip(legacy["key"].to_pylist(), legacy["max_tokens"].to_pylist(),
                                 legacy["model"].to_pylist())):
        key = sent[0]
        if key in wanted and key not in recorded and wanted[key][1] == sent[1:]:
            recorded.add(key)   # one row per key
            keep.append(i)
            shas.append(wanted[key][0])
    rows = legacy.take(pa.array(keep, pa.int64()))
    return rows.set_column(rows.schema.get_field_index("prompt_sha"), "prompt_sha",
                           pa.array(shas, pa.string()))


def adopt_unrecorded(requests: pa.Table, parts: pa.Table, work_dir: str, config: EngineConfig,
                     emit: Callable[[str], None]) -> pa.Table:
    """Stamp the reusable unrecorded rows of ``parts`` (the work folder's, as read) with the
    prompt sent now, written as a part, once, so a later edit of that prompt is sent again;
    returns those rows, and warns when there are any."""
    if config.unrecorded == "resend":
        return RESULT_SCHEMA.empty_table()
    if config.unrecorded != "reuse":
        raise ValueError(f"EngineConfig.unrecorded {config.unrecorded!r}: give 'reuse' or "
                         "'resend'")
    adopted = unrecorded_matches(parts, requests)
    if adopted.num_rows:
        _write(adopted, storage.join(work_dir, "parts"))
        emit(f"warning: reused {adopted.num_rows:,} answers in {redact_uri(work_dir)} written "
             "before parts recorded their prompt, unchecked against the prompt sent now; if a "
             "query's text changed under its id since, rerun with --resend-unrecorded")
    return adopted


def plan(requests: pa.Table, work_dir: str, unrecorded: bool = False,
         parts: pa.Table | None = None) -> tuple[pa.Table, pa.Table]:
    """(requests still to do, results already in the parts). ``unrecorded``: also count as done
    the rows :func:`adopt_unrecorded` would reuse (a dry run, which writes nothing). ``parts``:
    the work folder's rows when the caller has read them (else they are read here)."""
    check_unique_keys(requests)
    if parts is None:
        parts = read_parts(storage.join(work_dir, "parts"))
    done = _requested(parts, requests)
    if unrecorded:
        done = pa.concat_tables([done, unrecorded_matches(parts, requests)])
    todo_keys = set(plan_todo(requests.column("key").to_pylist(),
                              set(done.column("key").to_pylist())))
    mask = pa.array([k in todo_keys for k in requests.column("key").to_pylist()], pa.bool_())
    return requests.filter(mask), done


def run_requests(requests: pa.Table, work_dir: str, catalog: Catalog, config: EngineConfig,
                 progress: Callable[[str], None] | None = None) -> EngineRun:
    """Run every request not yet answered in ``work_dir``; parts written as batches finish.
    Requests that repeat a key are refused before anything is written or sent."""
    check_unique_keys(requests)
    started = time.perf_counter()
    emit = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    parts = read_parts(storage.join(work_dir, "parts"))   # read once for both steps
    adopted = adopt_unrecorded(requests, parts, work_dir, config, emit)
    parts = pa.concat_tables([parts, adopted])   # as a fresh read would now give them
    todo, done = plan(requests, work_dir, parts=parts)
    keep_billed_failures(work_dir)
    storage.remove(storage.join(work_dir, "failures"))   # last run's failures: retried now
    billed_before = _billed(read_parts(storage.join(work_dir, "billed")))
    realised = _paid(parts) + billed_before
    models = sorted(set(requests.column("model").to_pylist()))
    settings = {m: asdict(s) for m, s in endpoint_settings(catalog, models,
                                                            config.workers).items()}
    meter = _Progress(todo.num_rows, realised, config.progress_every_s, emit)
    if todo.num_rows:
        with StopOnSignal.installed() as signalled:
            batches = (_ray_batches if config.executor == "ray" else _local_batches)(
                todo, settings, config, realised, signalled)
            with contextlib.closing(batches):   # its worker closed now, whatever stops the run
                write_batches(batches, work_dir, meter, signalled)
    meter.finish()
    parts = read_parts(storage.join(work_dir, "parts"))
    results, dropped = first_per_key(_requested(parts, requests))
    failures = read_parts(storage.join(work_dir, "failures"))
    return EngineRun(results=results, failures=failures, calls_planned=todo.num_rows,
                     calls_done_before=done.num_rows, duplicates_dropped=dropped,
                     unrecorded_reused=adopted.num_rows,
                     spend={"cap_usd": config.max_spend_usd, "realised_before_usd": realised,
                            "realised_usd": _paid(parts) + _billed(failures)
                            + billed_before,
                            "worst_case_planned_usd": worst_case_usd(todo),
                            "refused_calls": meter.refused},
                     wall_s=round(time.perf_counter() - started, 3),
                     throughput=throughput_by_endpoint(results) if results.num_rows else {})


def write_batches(batches, work_dir: str, meter: _Progress,
                  signalled: StopOnSignal | None = None) -> None:
    """Write each ``(batch, spend, close_book)`` as it comes (:func:`write_batch`). Where one
    stops the run, ``close_book`` (None: one batch at a time, none in flight) refuses new calls
    and the batches other Ray workers have in flight are still written, their paid answers with
    them (dropped unwritten before, paid again on the rerun); then the run stops. Reading the
    spend raising (the Ray ledger actor lost) stops it alike, and so does a Ctrl-C or SIGTERM
    (``signalled``), once the batch it came in is written."""
    stopped = closed = None
    for batch, spend, close_book in batches:
        try:
            write_batch(batch, work_dir)
            if stopped is None:   # spend read once the batch is written
                meter.update(batch, _spend_so_far(spend, work_dir))
        except SpendBookError as err:
            if close_book is None:
                raise
            if stopped is None:
                stopped = err
        if signalled is not None and signalled.signum is not None and close_book is None:
            break   # in-process: nothing else is in flight
        if close_book is not None and not closed and (stopped or (signalled and signalled.signum)):
            closed = True
            close_book()
    if stopped is not None:
        raise stopped
    if signalled is not None:
        signalled.raise_if_stopped()


def _spend_so_far(spend: Callable[[], dict], work_dir: str) -> dict:
    """The book's state (USD); where reading it raises (a Ray ledger actor lost: the next read
    raised out of the run, the batches in flight dropped unwritten, their paid answers with them),
    a :class:`SpendBookError` that stops the run once those are written."""
    try:
        return spend()
    except Exception as err:
        raise SpendBookError(
            f"stopped: {SpendBookError.raised(err)} reading the spend so far; the batches done are "
            f"written in {redact_uri(work_dir)}, where a rerun reads the spend so far back and "
            "resumes") from err


def write_batch(batch: pa.Table, work_dir: str) -> None:
    """A finished batch into ``parts/`` (answered) and ``failures/``; then, where booking a row's
    spend raised (:data:`SPEND_BOOK_FAILED` in its ``error``), :class:`SpendBookError` stops the
    run: the cap can no longer be kept, and the answers paid for are written first, not lost."""
    ok = batch.filter(batch["ok"])
    failed = batch.filter(pc.invert(batch["ok"]))
    if ok.num_rows:   # an answer's error only said its cost was not booked: not kept
        _write(ok.set_column(ok.schema.get_field_index("error"), "error",
                             pa.nulls(ok.num_rows, pa.string())), storage.join(work_dir, "parts"))
    if failed.num_rows:
        _write(failed, storage.join(work_dir, "failures"))
    unbooked = batch.filter(pc.fill_null(pc.match_substring(batch["error"], SPEND_BOOK_FAILED),
                                         False))
    if unbooked.num_rows:
        raise SpendBookError(
            f"stopped: {unbooked['error'][0].as_py()} (request {unbooked['key'][0].as_py()}, "
            f"{unbooked.num_rows} in its batch); the batch's {ok.num_rows} answer(s) and "
            f"{failed.num_rows} failure(s) are written in {redact_uri(work_dir)}, where a rerun "
            "reads the spend so far back and resumes")


def _billed(rows: pa.Table) -> float:
    """USD the provider billed for ``rows`` (RESULT_SCHEMA), answers it sent unreadable included,
    each row once per key and start time: a row can be in two parts (a failure moved to
    ``billed/`` again after a crash removing ``failures/`` left some of its parts, under the
    name of those left; an answer adopted from a part with no prompt hash)."""
    if rows.num_rows == 0:
        return 0.0
    once = rows.group_by(["key", "started_s"]).aggregate([("billed_usd", "max")])
    return float(pc.sum(once["billed_usd_max"]).as_py() or 0.0)


def _local_batches(todo: pa.Table, settings: dict, config: EngineConfig, realised: float,
                   signalled: StopOnSignal):
    book = SpendBook(cap_usd=config.max_spend_usd, realised_usd=realised)
    worker = RequestWorker(settings, asdict(config.retry), book=book, seed=config.seed)
    signalled.listeners.append(worker.stop)
    try:
        for start in range(0, todo.num_rows, config.batch_rows):
            yield worker(todo.slice(start, config.batch_rows)), book.state, None
    finally:
        worker.close()


def _ray_batches(todo: pa.Table, settings: dict, config: EngineConfig, realised: float,
                 signalled: StopOnSignal):
    """Batches from a Ray Data actor pool sharing one ledger actor; on a Ctrl-C or SIGTERM
    (``signalled``) :func:`write_batches` closes the ledger and drains the rest: calls the
    workers have in flight come back and are written, the others come back not called."""
    import ray

    from r2ray.batch.job import _init_ray

    _init_ray()   # keeps ``signalled`` as the SIGTERM handler, where ray.init set Ray's
    ledger = ray.remote(num_cpus=0)(SpendLedger).remote(config.max_spend_usd, realised)
    ds = ray.data.from_arrow(todo).repartition(
        max(1, -(-todo.num_rows // config.batch_rows))).map_batches(
        RequestWorker, batch_size=config.batch_rows, batch_format="pyarrow",
        fn_constructor_kwargs={"settings": settings, "retry": asdict(config.retry),
                               "ledger": ledger, "seed": config.seed},
        compute=ray.data.ActorPoolStrategy(size=config.workers), num_cpus=config.cpus_per_worker)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch, lambda: ray.get(ledger.state.remote()), ledger.close.remote


class _Progress:
    """calls done, rate, spend so far, ETA — one line every ``every_s`` seconds."""

    def __init__(self, total: int, realised: float, every_s: float, emit: Callable[[str], None]):
        self.total, self.done, self.failed, self.refused = total, 0, 0, 0
        self.spend_usd, self.every_s, self.emit = realised, every_s, emit
        self.start = self.last = time.perf_counter()
        self.shown = -1   # calls done at the last line shown

    def update(self, batch: pa.Table, spend: dict) -> None:
        self.done += batch.num_rows
        self.failed += batch.num_rows - pc.sum(batch["ok"].cast(pa.int64())).as_py()
        self.spend_usd, self.refused = spend["realised_usd"], spend["refused"]
        if time.perf_counter() - self.last >= self.every_s:
            self.emit(self.line())
            self.last, self.shown = time.perf_counter(), self.done

    def line(self) -> str:
        elapsed = max(1e-9, time.perf_counter() - self.start)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"calls {self.done:,}/{self.total:,} ({self.failed:,} failed), {rate:.2f}/s, "
                f"spend ${usd_digits(self.spend_usd)}, ETA {eta:.0f} s")

    def finish(self) -> None:
        if self.total and self.shown != self.done:
            self.emit(self.line())
