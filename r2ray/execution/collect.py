"""``r2ray bench collect``: queries × arms → answers from the pool → graded → the long bench.

Queries (parquet or jsonl): ``query_id``, ``query``, optional ``category``, ``reference``,
``grader`` (``exact``, ``choice``, ``numeric``, ``math``, ``judge``). Every query gets every arm
(``arms="all"``) or k arms, dealt so every arm is answered equally often (±1). A failed call is
no bench row: it is in ``<work>/answers/failures/`` with its reason and is retried by a rerun.
A row's ``input_tokens`` is the query's own prompt as routing estimates it, the same on every arm
(:func:`bench_input_tokens`); its ``cost_usd`` is the bill of the prompt sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from r2ray import __version__, storage
from r2ray.batch.report import usd_digits
from r2ray.bench.io import check_apart, check_output_name, read_table, write_table
from r2ray.bench.schema import bench_error, validate_bench
from r2ray.bench.stats import bench_stats, format_stats
from r2ray.catalog import Catalog, budget_label, load_catalog, save_catalog
from r2ray.errors import R2RayError
from r2ray.execution import graders
from r2ray.execution.engine import EngineConfig, EngineRun, run_requests
from r2ray.execution.requests import arm_request, request_row, requests_table, worst_case_usd
from r2ray.execution.workdir import check_work, commit_work, open_work
from r2ray.prompting import estimate_tokens
from r2ray.redaction import redact_values

JUDGE_MAX_TOKENS = 16   # "Score: 0.75" and a little room


@dataclass(frozen=True)
class CollectConfig:
    queries: str
    catalog: str
    out: str                              # the bench, .parquet or .jsonl
    work: str | None = None               # default: <out without suffix>.work
    arms: str = "all"                     # "all" or k arms per query
    seed: int = 0
    grader: str | None = None             # for queries without a `grader`
    judge_model: str | None = None        # a model of judge_catalog (default: --catalog)
    judge_catalog: str | None = None
    dry_run: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def work_dir(self) -> str:
        return self.work or self.out.rsplit(".", 1)[0] + ".work"


def assign_arms(n_queries: int, n_arms: int, k: int, seed: int) -> list[list[int]]:
    """k distinct arms per query; over all queries each arm is dealt ⌊nk/K⌋ or ⌈nk/K⌉ times."""
    if not 1 <= k <= n_arms:
        raise graders.GraderError(f"--arms {k}: give 'all' or a number of arms from 1 to {n_arms}")
    order = np.random.default_rng(seed).permutation(n_arms)
    return [sorted(int(order[(i * k + j) % n_arms]) for j in range(k)) for i in range(n_queries)]


def read_queries(uri: str, default_grader: str | None, judge: bool) -> list[dict]:
    """Query rows, checked: a bad one is an error naming the file, row and field."""
    table = read_table(uri)
    for name in ("query_id", "query"):
        if name not in table.column_names:
            raise bench_error(uri, None, name, f"missing column {name!r}; queries need "
                              "query_id, query (optional category, reference, grader)")
    rows = table.to_pylist()
    seen: set[str] = set()
    for i, row in enumerate(rows):
        for name in ("query_id", "query"):
            if row.get(name) is None or not str(row[name]).strip():
                raise bench_error(uri, i, name, "is empty")
        if not isinstance(row["query"], str):   # a struct or number failed in estimate_tokens
            raise bench_error(uri, i, "query", f"is {type(row['query']).__name__} "
                              f"{row['query']!r}, not text")
        row["query_id"] = str(row["query_id"])
        if row["query_id"] in seen:
            raise bench_error(uri, i, "query_id", f"duplicate query_id {row['query_id']!r}")
        seen.add(row["query_id"])
        grader = row.get("grader") or default_grader or ("exact" if row.get("reference") is not None
                                                        else ("judge" if judge else None))
        if grader not in graders.GRADER_NAMES:
            raise bench_error(uri, i, "grader", f"grader {grader!r}: give one of "
                              f"{graders.GRADER_NAMES} in the row or with --grader")
        if grader != "judge" and (row.get("reference") is None
                                  or not graders.normalise(str(row["reference"]))):
            # an empty reference would grade an empty answer 1.0
            raise bench_error(uri, i, "reference", f"grader {grader!r} needs a reference "
                              "(not empty, not punctuation alone)")
        if grader == "judge" and not judge:
            raise bench_error(uri, i, "grader", "grader 'judge' needs --judge-model")
        row.update(grader=grader, category=row.get("category"),
                   reference=None if row.get("reference") is None else str(row["reference"]))
    return rows


def answer_requests(queries: list[dict], catalog: Catalog, arms: str, seed: int) -> pa.Table:
    every = list(range(catalog.n_arms))
    dealt = (None if arms == "all"
             else assign_arms(len(queries), catalog.n_arms, int(arms), seed))
    rows = []
    for i, query in enumerate(queries):
        for j in (every if dealt is None else dealt[i]):
            model, budget = catalog.arms[j]
            rows.append(arm_request(catalog, query["query_id"], query["query"], model, budget))
    return requests_table(rows)


def judge_requests(answers: pa.Table, queries: dict[str, dict], judge: Catalog,
                   judge_model: str) -> pa.Table:
    """One judge call per answer whose grader is the judge or that has a reference (to measure
    the judge against the reference graders)."""
    rows = []
    for answer in answers.to_pylist():
        query = queries[answer["query_id"]]
        if query["grader"] != "judge" and query["reference"] is None:
            continue
        row = request_row(judge, "judge", answer["query_id"], judge_model, 0,
                          graders.judge_messages(query["query"], answer["response"] or "",
                                                 query["reference"]), JUDGE_MAX_TOKENS)
        row.update(key=f"{answer['key']}-judge", model=judge_model, budget=0)
        row["query_id"] = json.dumps([answer["query_id"], answer["model"], answer["budget"]])
        rows.append(row)
    return requests_table(rows)


@dataclass
class CollectResult:
    bench_rows: int
    answers: EngineRun
    judge: EngineRun | None
    stats: pa.Table
    agreement: dict | None
    ungraded: int
    manifest: dict

    def summary(self) -> str:
        a = self.answers
        lines = [f"bench: {self.bench_rows:,} rows "
                 f"({a.results.num_rows:,} answered, {a.failures.num_rows:,} failed calls, "
                 f"{self.ungraded:,} ungraded)",
                 f"spend: ${usd_digits(self.manifest['spend']['total_usd'])} "
                 f"(answers ${usd_digits(a.spend['realised_usd'])}"
                 + (f", judge ${usd_digits(self.judge.spend['realised_usd'])}"
                    if self.judge else "")
                 + ")"]
        for endpoint, t in a.throughput.items():
            lines.append(f"  {endpoint}: {t['calls']} calls, {t['calls_per_s']:.2f} calls/s, "
                         f"{t['output_tokens_per_s']:.1f} output tokens/s")
        if self.agreement:
            lines.append(f"judge vs reference graders: agreement {self.agreement['agreement']} "
                         f"on {self.agreement['rows']} rows; "
                         f"{self.manifest['counts']['judge_unscored']:,} judge replies gave no "
                         "score")
        if a.failures.num_rows:
            lines.append(f"failures: {a.summary()['failure_reasons']} — rerun to retry them")
        return "\n".join(lines + [format_stats(self.stats)])


def dry_run(config: CollectConfig) -> str:
    catalog = load_catalog(config.catalog)
    queries = read_queries(config.queries, config.grader, config.judge_model is not None)
    requests = answer_requests(queries, catalog, config.arms, config.seed)
    check_work(config.work_dir, work_binding(catalog))
    from r2ray.execution.engine import plan

    todo, done = plan(requests, storage.join(config.work_dir, "answers"),
                      config.engine.unrecorded == "reuse")
    worst = worst_case_usd(todo)
    judged = 0
    judge_worst = judge_typical = 0.0
    if config.judge_model:
        judge = load_catalog(config.judge_catalog or config.catalog)
        spec = judge.model(config.judge_model)
        by_id = {q["query_id"]: q for q in queries}
        per_call = judge_worst_usd(spec)
        for r in requests.to_pylist():
            q = by_id[r["query_id"]]
            if q["grader"] == "judge" or q["reference"] is not None:
                judged += 1
                judge_worst += per_call
                judge_typical += judge_typical_usd(spec, r, q)
    return (f"dry run: {todo.num_rows:,} answer calls to make ({done.num_rows:,} already done), "
            f"worst case ${usd_digits(worst)} at the caps"
            + (f"; up to {judged:,} judge calls, worst case ${usd_digits(judge_worst)} (each "
               f"prompt the judge's whole context; with answers of {TYPICAL_BYTES_PER_TOKEN} bytes "
               f"a token at their caps, ${usd_digits(judge_typical)})" if judged else "")
            + f"; total worst case ${usd_digits(worst + judge_worst)}")


TYPICAL_BYTES_PER_TOKEN = 4   # English text in a BPE vocabulary: about 4 UTF-8 bytes a token


def judge_typical_usd(spec, request: dict, query: dict) -> float:
    """USD of one judge call whose answer fills its cap at ``TYPICAL_BYTES_PER_TOKEN`` bytes a
    token: an estimate, not a bound (:func:`judge_worst_usd` is the bound)."""
    prompt = (request["input_tokens_bound"] + len((query["reference"] or "").encode())
              + TYPICAL_BYTES_PER_TOKEN * request["max_tokens"]
              + len(graders.JUDGE_RUBRIC.encode()) + 64)
    return float(min(prompt, spec.context) * spec.input_per_m
                 + JUDGE_MAX_TOKENS * spec.output_per_m) * 1e-6


def judge_worst_usd(spec) -> float:
    """USD bound of one judge call before its answer is known: a prompt of the judge's whole
    context window (a longer one is refused, unbilled) and ``JUDGE_MAX_TOKENS`` out. The answer
    it embeds is ``max_tokens`` tokens but of unknown UTF-8 bytes (one token can be many), and
    the judge's own bound counts bytes, so no tighter figure is a bound on what it reserves."""
    return float(spec.context * spec.input_per_m + JUDGE_MAX_TOKENS * spec.output_per_m) * 1e-6


def collect(config: CollectConfig, progress=None) -> CollectResult:
    """Answer, judge where asked, grade, write the bench (and its catalogue), then the manifest."""
    check_output_name(config.out, "--out")
    check_apart([("--out", config.out)], [("--queries", config.queries)])
    catalog = load_catalog(config.catalog)
    judge_cat = load_catalog(config.judge_catalog or config.catalog) if config.judge_model else None
    if judge_cat is not None:
        judge_cat.model(config.judge_model)
    queries = read_queries(config.queries, config.grader, judge_cat is not None)
    by_id = {q["query_id"]: q for q in queries}
    requests = answer_requests(queries, catalog, config.arms, config.seed)
    open_work(config.work_dir, work_binding(catalog))
    cap = config.engine.max_spend_usd
    answer_engine = config.engine if cap is None or judge_cat is None else _with_cap(
        config.engine, cap - judge_spent_usd(config.work_dir))
    answers = run_requests(requests, storage.join(config.work_dir, "answers"), catalog,
                           answer_engine, progress)
    judge_run = None
    scores: dict[str, float] = {}
    unscored = 0   # judge replies without a score in [0, 1]
    if judge_cat is not None:
        jreq = judge_requests(answers.results, by_id, judge_cat, config.judge_model)
        engine = config.engine if cap is None else _with_cap(
            config.engine, cap - answers.spend["realised_usd"])
        judge_run = run_requests(jreq, storage.join(config.work_dir, "judge"), judge_cat, engine,
                                 progress)
        for r in judge_run.results.to_pylist():
            score = graders.parse_judge_score(r["response"])
            if score is None:
                unscored += 1
            else:
                scores[r["key"].removesuffix("-judge")] = score
    rows, pairs_judge, pairs_ref, ungraded = [], [], [], 0
    for answer in answers.results.to_pylist():
        query = by_id[answer["query_id"]]
        reference_grade = (None if query["grader"] == "judge" else
                           graders.grade(query["grader"], answer["response"], query["reference"]))
        judged = scores.get(answer["key"])
        if reference_grade is not None and judged is not None:
            pairs_judge.append(judged)
            pairs_ref.append(reference_grade)
        quality = judged if query["grader"] == "judge" else reference_grade
        if quality is None:
            ungraded += 1    # the judge failed or gave no score: no row, never a 0
            continue
        rows.append({"query_id": answer["query_id"], "query": query["query"],
                     "category": query["category"], "model": answer["model"],
                     "budget": answer["budget"],
                     "input_tokens": bench_input_tokens(query["query"]),
                     "output_tokens": answer["output_tokens"], "quality": float(quality),
                     "truncated": answer["truncated"], "response": answer["response"],
                     "cost_usd": answer["cost_usd"]})
    if not rows:
        raise R2RayError(_nothing_graded(requests.num_rows, answers, ungraded, config.work_dir))
    bench = validate_bench(pa.Table.from_pylist(rows), config.out, catalog)
    write_table(bench, config.out)
    save_catalog(catalog, config.out.rsplit(".", 1)[0] + ".catalog.yaml")
    stats = bench_stats(bench, catalog)
    agreement = graders.agreement(pairs_judge, pairs_ref) if judge_cat is not None else None
    judge_spend = judge_run.spend["realised_usd"] if judge_run else 0.0
    manifest = {
        "kind": "bench-collect", "r2ray_version": __version__, "bench": config.out,
        "catalog_fingerprint": catalog.fingerprint,
        "config": {"queries": config.queries, "catalog": config.catalog, "arms": config.arms,
                   "seed": config.seed, "grader": config.grader, "judge_model": config.judge_model,
                   "max_spend_usd": config.engine.max_spend_usd},
        "counts": {"queries": len(queries), "requests": requests.num_rows,
                   "bench_rows": bench.num_rows, "ungraded": ungraded,
                   "judge_unscored": unscored},
        "answers": answers.summary(), "judge": judge_run.summary() if judge_run else None,
        "judge_agreement": agreement,
        "spend": {"total_usd": answers.spend["realised_usd"] + judge_spend},
        "stats": _stats_records(stats),
    }
    commit_work(config.work_dir, redact_values(manifest))
    return CollectResult(bench.num_rows, answers, judge_run, stats, agreement, ungraded, manifest)


def work_binding(catalog: Catalog) -> dict:
    """What the work folder's answers were priced at: each model's prices (USD per million
    tokens, in/out). A bench row's ``cost_usd`` is its recorded answer's, so answers priced by
    another catalogue made a bench at odds with the catalogue saved beside it."""
    prices = ", ".join(f"{m.name} {m.input_per_m!r}/{m.output_per_m!r}"
                       for m in sorted(catalog.models, key=lambda m: m.name))
    return {"kind": "bench-collect", "prices_usd_per_m": prices}


def bench_input_tokens(query: str) -> int:
    """Tokens of the query's own prompt, as a bench row records them: routing's estimate
    (:func:`estimate_tokens`, the figure :func:`arm_request` renders the call with), the same on
    every arm. Not the API's count of the prompt sent, which differs per arm and includes the
    length instruction that ĉ (``routing.call_cost_usd``) adds on its own: priced twice, and
    ``bench_arrays`` taking a query's first row, evaluation and κ read whichever arm came first.
    The API's count stays in ``<work>/answers/`` and is billed in ``cost_usd``."""
    return estimate_tokens(query)


def _nothing_graded(requests: int, answers: EngineRun, ungraded: int, work_dir: str) -> str:
    """Why a collect has no bench row to write: its answers' outcome, failures by reason."""
    reasons = "; ".join(f"{n} {reason}" for reason, n in
                        sorted(answers.summary()["failure_reasons"].items()))
    return (f"no bench row to write: of {requests} answer request(s), "
            f"{answers.results.num_rows} were answered ({ungraded} of them without a grade) and "
            f"{answers.failures.num_rows} failed" + (f" ({reasons})" if reasons else "")
            + f"; the spend so far is kept in {work_dir}, and a rerun resumes there")


def judge_spent_usd(work_dir: str) -> float:
    """USD the judge already spent in ``work_dir``: every judge row, whatever its key, billed
    failures too, counted as the judge run counts its realised spend (at least that: failures/
    is counted too, before the run moves what was billed of it to billed/). The answers' cap
    leaves it out, so answers + judge stay within --max-spend-usd over reruns of a work folder."""
    from r2ray.execution.engine import _billed, _paid, read_parts

    judge = storage.join(work_dir, "judge")
    return _paid(read_parts(storage.join(judge, "parts"))) + _billed(pa.concat_tables(
        [read_parts(storage.join(judge, folder)) for folder in ("failures", "billed")]))


def _with_cap(engine: EngineConfig, cap: float) -> EngineConfig:
    from dataclasses import replace

    return replace(engine, max_spend_usd=max(0.0, cap))


def _stats_records(stats: pa.Table) -> list[dict]:
    return [dict(r, budget=budget_label(r["budget"])) for r in stats.to_pylist()]
