"""Batch and Serve decide alike: the differential check of STYLE 8, without Ray or HTTP.

A backlog goes through the batch job's stages in process (validate → ``score_batch`` → the step
table → ``solve_budget`` → ``assign_stage``); Serve then starts from that run's committed
manifest (its λ*, tie cut, seed and cost basis) and routes every query through ``/v1/route``,
``/v1/chat/completions`` (no endpoint: the routing alone) and a batched router call. Each must
give the query the model, budget, messages and ``max_tokens`` the batch job wrote, except the
queries the solve's greedy fill moved and, for the one-query calls (whose q̂ is predicted alone,
float32 rounding apart from the batch's), a query with a hull step exactly at λ* (tied copies,
the step λ* splits).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from r2ray.batch.assign import assign_stage
from r2ray.batch.backlog import plan_units, read_and_validate
from r2ray.batch.score import score_batch
from r2ray.bench.synthetic import synth_backlog
from r2ray.manifest import RunPaths, commit
from r2ray.predictor import load_predictor
from r2ray.prompting import max_tokens_for
from r2ray.serving.config import PacingConfig, serve_config
from r2ray.serving.pacer import Pacer, starting_price
from r2ray.serving.router import RouteItem, RoutingModel, route_items
from r2ray.serving.schema import ChatCompletionRequest, RouteRequest, RoutingOptions
from r2ray.serving.service import RoutingService, SpendBook, route_item
from r2ray.solver import solve_budget, table_to_steps

SEED = 7
LONG_QUERY_TOKENS = [   # input tokens, each near a model's context (32,768; 131,072; 202,752)
    28_000, 30_000, 32_000, 127_500, 129_500, 199_000, 201_000, 202_000]
DECISION = ("model", "budget", "messages", "max_tokens")


def _backlog(catalog, embedding_dim: int, folder) -> pa.Table:
    """300 synthetic queries with embeddings, the first 10 sent 3 times more under new ids (their
    hull steps tie exactly), 8 padded to ``LONG_QUERY_TOKENS`` (near each model's context, so
    ``max_tokens`` is context-bound) and 5 with white space around them, validated as the batch
    job validates them (input tokens estimated from the text, as Serve estimates them)."""
    rows = synth_backlog(catalog, 300, seed=5, embeddings=True).to_pylist()
    rows += [dict(r, query_id=f"{r['query_id']}-copy{k}") for r in rows[:10] for k in range(3)]
    rows += [dict(r, query_id=f"{r['query_id']}-long", query=f"{r['query']} {'x' * 4 * tokens}")
             for r, tokens in zip(rows[10:], LONG_QUERY_TOKENS)]
    rows += [dict(r, query_id=f"{r['query_id']}-padded", query=f"  {r['query']}\n")
             for r in rows[20:25]]
    for row in rows:
        del row["input_tokens"]
    path = folder / "backlog.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    units, unreadable = plan_units(str(path))
    good, bad = read_and_validate(units[0], max(m.context for m in catalog.models),
                                  embedding_dim, embedding_required=True)
    assert unreadable.num_rows == bad.num_rows == 0 and good.num_rows == len(rows)
    return good


def _batch_run(model: RoutingModel, backlog: pa.Table, share: float, strict: bool, folder):
    """The batch job's stages at a budget ``share`` of the way from the cheapest plan to the
    best: (routed rows by query_id, the solve, its hull steps), the run's manifest committed."""
    factors = None if model.cost_factors is None else model.cost_factors.tolist()
    scored = score_batch(backlog, model.predictor, model.catalog, strict_budget=strict,
                         cost_factors=model.cost_factors)
    steps, _, keys, _ = table_to_steps(scored)
    solved = solve_budget(steps, steps.base_c.sum() + share * steps.dc.sum(), seed=SEED,
                          query_key=keys)
    cert = solved.certificate
    block = scored.append_column("arm", pa.array(solved.arm)).append_column(
        "lambda_star", pa.array(np.full(scored.num_rows, cert.lam)))
    assign_stage(block, model.catalog.to_yaml(), str(folder / "routed"), str(folder / "deferred"),
                 model.version, "night", strict, factors)
    commit(RunPaths(str(folder), "night"), {
        "committed_at": "2026-01-01T00:00:00+00:00", "model": {"label": model.version},
        "catalog_fingerprint": model.catalog.fingerprint,
        "spend": {"strict_budget": strict, "cost_correction": {"applied": False}},
        "solve": {"lambda": cert.lam, "seed": cert.seed, "tie_cut": cert.tie_cut}})
    routed = ds.dataset(str(folder / "routed"), format="parquet", partitioning="hive")
    return {r["query_id"]: r for r in routed.to_table().to_pylist()}, solved, steps


def _service(model: RoutingModel, folder) -> RoutingService:
    """Serve's ingress as ``build_app`` wires it, priced from the run's manifest, routing each
    request alone (a lone request's path)."""
    start = starting_price(str(folder), None)
    book = SpendBook(Pacer(PacingConfig(), start.lam, tie_cut=start.tie_cut, seed=start.seed,
                           source=start.source, solved_for=start.solved_for).state())

    async def route(item):
        return route_items(model, [item])[0]

    async def describe():
        return {}

    return RoutingService(serve_config({}), route, book, describe)


def _online(service: RoutingService, model: RoutingModel, rows: list[dict]) -> dict[str, list]:
    """Each query's decision fields through /v1/route, chat, and one batched router call."""
    def options(row):
        return {"query_id": row["query_id"], "embedding": list(row["embedding"])}

    async def lone():
        routes = [(await service.route(RouteRequest(query=r["query"], **options(r))))[0]
                  for r in rows]
        chats = [(await service.chat(ChatCompletionRequest(
            model="r2ray", messages=[{"role": "user", "content": r["query"]}],
            r2ray=RoutingOptions(**options(r)))))[0] for r in rows]
        return routes, chats

    routes, chats = asyncio.run(lone())
    price = service.book.state
    batched = route_items(model, [route_item(RouteRequest(query=r["query"], **options(r)),
                                             r["query"], r["input_tokens"], price, 0)
                                  for r in rows])
    return {"route": [tuple(d.model_dump()[f] for f in DECISION) for d in routes],
            "chat": [tuple(d[f] for f in DECISION) for d in chats],
            "batched": [tuple(getattr(d, f) for f in DECISION) for d in batched]}


def _at_lambda(steps, lam: float) -> np.ndarray:
    """bool [N]: queries with a hull step whose efficiency (dq/dc) is exactly ``lam``."""
    on = steps.dq / steps.dc == lam
    return np.bincount(np.repeat(np.arange(steps.n_queries), steps.steps_per_query)[on],
                       minlength=steps.n_queries) > 0


def _context_bound(batch: dict[str, dict], catalog) -> list[str]:
    """Query ids whose routed ``max_tokens`` is their model's context less the prompt (tokens),
    below the budget's own cap: the long queries' branch of the cap rule, where the input-token
    estimate decides the cap."""
    return [q for q, r in batch.items() if r["max_tokens"] < max_tokens_for(
        r["budget"], 2**40, 0, catalog.model(r["model"]).output_cap_tokens)]


@pytest.mark.parametrize("share, strict", [(0.4, False), (0.4, True), (1.5, False)],
                         ids=["predicted", "strict-budget", "lambda-0"])
def test_serve_gives_each_query_the_batch_jobs_decision(small_routing_model, tmp_path, share,
                                                         strict):
    catalog = small_routing_model["catalog"]
    factors = np.linspace(0.6, 1.7, catalog.n_arms)   # a reconciliation's ĉ factors, per arm
    model = RoutingModel(load_predictor(small_routing_model["path"]), None, catalog, "test/1",
                         cost_factors=factors)
    backlog = _backlog(catalog, model.embedding_dim, tmp_path)
    batch, solved, steps = _batch_run(model, backlog, share, strict, tmp_path)
    assert (share > 1) == (solved.certificate.lam == 0)
    rows = backlog.to_pylist()
    online = _online(_service(model, tmp_path), model, rows)

    wanted = [tuple(batch[r["query_id"]][f] for f in DECISION) for r in rows]
    assert _context_bound(batch, catalog), "no routed max_tokens is bound by a context window"
    moved = solved.filled
    split = _at_lambda(steps, solved.certificate.lam)
    assert moved.sum() + split.sum() <= 12, (moved.sum(), split.sum())
    for path, decisions in online.items():
        excused = moved if path == "batched" else moved | split
        differ = [rows[i]["query_id"] for i in range(len(rows))
                  if not excused[i] and decisions[i] != wanted[i]]
        assert differ == [], f"{path}: {len(differ)} queries routed unlike the batch job"


def test_a_price_written_as_minus_zero_routes_as_zero(small_routing_model):
    """``"lambda": -0.0`` passes the schema's ``ge=0`` and is the price 0 (each query's best arm,
    as a batch run with λ* = 0 gives it). Before, its sign bit made it the largest price in the
    tie rule's bit comparison: every query went to its cheapest arm."""
    model = RoutingModel(load_predictor(small_routing_model["path"]), None,
                         small_routing_model["catalog"], "test/1")
    rows = synth_backlog(model.catalog, 40, seed=3, embeddings=True).to_pylist()
    request = RouteRequest.model_validate_json('{"query": "q", "lambda": -0.0}')
    assert request.lam == 0 and str(request.lam) == "-0.0"

    def arms(lam: float, rows: list[dict]) -> list[int]:
        items = [RouteItem(query=r["query"], input_tokens=r["input_tokens"], key=i, lam=lam,
                           embedding=list(r["embedding"])) for i, r in enumerate(rows)]
        return [d.arm for d in route_items(model, items)]

    best, cheapest = arms(0.0, rows), arms(float("inf"), rows)
    assert sum(b != c for b, c in zip(best, cheapest)) > 30      # the two prices route apart
    assert arms(request.lam, rows) == best                       # many rows: choose_arms
    assert [arms(request.lam, [r])[0] for r in rows] == best     # one row: choose_arm
