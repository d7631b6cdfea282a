"""Online routing without Ray: pacing maths and a simulated stream, request schemas, auth, the
decision path agreeing with the batch solve, and the HTTP API in process (ASGI, no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import pickle
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import REPO
from r2ray.batch.score import score_batch
from r2ray.bench.synthetic import synth_backlog
from r2ray.catalog import catalog_from_dict
from r2ray.errors import R2RayError
from r2ray.predictor import load_predictor
from r2ray.prompting import estimate_tokens, estimate_tokens_array
from r2ray.routing import arm_scores
from r2ray.manifest import RunPaths, commit
from r2ray.serving.api import InFlight, build_api
from r2ray.serving.auth import AuthError, check_bearer, key_digest, load_key_digests
from r2ray.serving.config import PacingConfig, serve_config
from r2ray.serving.pacer import Pacer, PriceState, paced_lambda, starting_price
from r2ray.routing import query_key
from r2ray.serving.router import RouteItem, RouteRejected, RoutingModel, route_items
from r2ray.serving.schema import ChatCompletionRequest, RouteRequest
from r2ray.serving.service import (RoutingService, SpendBook, route_item, routing_headers,
                                   upstream_body)
from r2ray.solver import choose_arms, hull_steps, solve_budget, table_to_steps


# ---- pacing --------------------------------------------------------------------------------------
def test_paced_lambda_is_the_multiplicative_update_clamped():
    config = PacingConfig(target_usd_per_s=1.0, eta=0.5, lambda_min=0.1, lambda_max=100.0,
                          max_ratio=4.0)
    assert paced_lambda(10.0, 1.0, 1.0, config) == pytest.approx(10.0)           # on target
    assert paced_lambda(10.0, 2.0, 1.0, config) == pytest.approx(10.0 * math.exp(0.5))
    assert paced_lambda(10.0, 0.0, 1.0, config) == pytest.approx(10.0 * math.exp(-0.5))
    assert paced_lambda(10.0, 50.0, 1.0, config) == pytest.approx(10.0 * math.exp(1.5))  # ratio 4
    assert paced_lambda(90.0, 4.0, 1.0, config) == 100.0                          # upper clamp
    assert paced_lambda(0.11, 0.0, 1.0, config) == 0.1                            # lower clamp


def test_pacer_updates_once_per_window_and_hard_stops():
    config = PacingConfig(target_usd_per_s=0.01, window_s=10.0, eta=1.0, hard_stop_ratio=2.0)
    pacer = Pacer(config, 5.0, now=0.0)
    pacer.record(0.05, now=3.0)
    assert pacer.tick(9.9).updates == 0 and pacer.lam == 5.0
    pacer.record(0.15, now=9.95)            # window spend 0.2 = 2 × the window's 0.1 share
    assert pacer.stopped
    state = pacer.tick(10.0)                # rate 0.02 USD/s = 2 × target
    assert state.updates == 1 and state.lam == pytest.approx(5.0 * math.e)
    assert not state.stopped and state.window_spend_usd == 0 and state.total_spend_usd == 0.2
    limited = Pacer(PacingConfig(spend_limit_usd=1.0), 5.0)
    limited.record(0.999, now=1.0)
    assert not limited.stopped
    limited.record(0.002, now=2.0)
    assert limited.stopped and limited.tick(1e6).lam == 5.0  # no target: λ never moves



def test_an_idle_stretch_leaves_lambda_where_traffic_left_it():
    """A window in which no query was booked says nothing of the price: an idle hour stepped λ
    down once a window, from 5 to λ_min, and sent the traffic after it to the dearest arms. A
    window of free queries (0 USD, a free arm) is traffic, and lowers λ as before."""
    config = PacingConfig(target_usd_per_s=0.01, window_s=10.0, eta=0.5)
    pacer = Pacer(config, 5.0, now=0.0)
    for second in range(1, 3601):           # the ingresses' syncs tick it while nobody calls
        pacer.tick(float(second))
    assert pacer.lam == 5.0 and pacer.state().updates == 0   # before the fix: 0.001, 360
    pacer.record(0.0, now=3601.0, queries=3)
    assert pacer.tick(3611.0).lam == pytest.approx(5.0 * math.exp(-0.5))

def _stream_window(rng, n: int, difficulty: float) -> tuple[np.ndarray, np.ndarray]:
    """q, c [n, 12] for 3 models × 4 budgets; harder queries need more tokens for the same
    quality and write longer answers, so the same λ buys dearer arms as difficulty drifts up."""
    price_out = np.array([0.04, 0.30, 1.76]) * 1e-6          # USD per output token
    skill = np.array([0.55, 0.75, 0.92])
    budgets = np.array([20.0, 100.0, 400.0, 1000.0])
    d = np.clip(difficulty + 0.1 * rng.standard_normal(n), 0.05, 0.95)[:, None, None]
    tokens = budgets * (0.4 + d) * rng.lognormal(0.0, 0.25, (n, 3, 4))
    quality = skill[:, None] * (1 - np.exp(-budgets / (300.0 * d))) \
        + 0.02 * rng.standard_normal((n, 3, 4))
    return quality.reshape(n, 12).astype(np.float32), (tokens * price_out[:, None]).reshape(n, 12)


def _simulate(pacer: Pacer | None, lam: float, seconds: int, rate_qps: int, seed: int) -> float:
    """Spend (USD) of a stream whose difficulty drifts from 0.3 to 0.8; λ fixed without a pacer."""
    rng = np.random.default_rng(seed)
    spend, step = 0.0, 5                                 # queries arrive in 5 s slices
    for t in range(0, seconds, step):
        q, c = _stream_window(rng, rate_qps * step, 0.3 + 0.5 * t / seconds)
        price = pacer.tick(float(t)).lam if pacer else lam
        slice_spend = c[np.arange(len(c)), choose_arms(q, c, price)].sum()
        spend += slice_spend
        if pacer:
            pacer.record(slice_spend, float(t + step))
    return spend


def test_pacing_holds_spend_within_5_percent_over_a_drifting_stream():
    rate_qps, seconds, target = 20, 3600, 2e-4            # USD per second
    q, c = _stream_window(np.random.default_rng(99), 2000, 0.3)
    per_query_usd = target / rate_qps
    start = solve_budget(hull_steps(q, c), per_query_usd * len(q)).certificate.lam  # "batch λ*"
    config = PacingConfig(target_usd_per_s=target, window_s=30.0, eta=0.5, hard_stop_ratio=None)
    fixed = _simulate(None, start, seconds, rate_qps, seed=1)
    paced = _simulate(Pacer(config, start), start, seconds, rate_qps, seed=1)
    assert abs(fixed / (target * seconds) - 1) > 0.25     # the drift matters at a fixed price
    assert paced / (target * seconds) == pytest.approx(1.0, abs=0.05)


def _spend_with_overrides(config: PacingConfig, start: float, share: float, seconds: int,
                          rate_qps: int, seed: int) -> float:
    """Spend (USD) of the drifting stream when a ``share`` of its queries ask for ``lambda: 0``
    (their best predicted arm at any price), priced as a router prices them."""
    rng, asks = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    pacer, spend, step = Pacer(config, start), 0.0, 5
    for t in range(0, seconds, step):
        q, c = _stream_window(rng, rate_qps * step, 0.3 + 0.5 * t / seconds)
        state = pacer.tick(float(t))
        asking = asks.random(len(q)) < share
        slice_spend = 0.0
        for rows, lam in ((asking, state.request_price(0.0)[0]), (~asking, state.lam)):
            arms = choose_arms(q[rows], c[rows], lam)
            slice_spend += c[rows][np.arange(rows.sum()), arms].sum()
        spend += slice_spend
        pacer.record(slice_spend, float(t + step))
    return spend


def test_a_request_lambda_cannot_spend_past_the_paced_target():
    """With ``request_lambda: floor`` (the default) a request's λ only raises its price: a fifth of
    the traffic asking for λ = 0 keeps spend at the target; as an override it overspends."""
    rate_qps, seconds, target = 20, 3600, 2e-4
    q, c = _stream_window(np.random.default_rng(99), 2000, 0.3)
    start = solve_budget(hull_steps(q, c), target / rate_qps * len(q)).certificate.lam
    common = dict(target_usd_per_s=target, window_s=30.0, eta=0.5, hard_stop_ratio=None)
    floor = _spend_with_overrides(PacingConfig(**common), start, 0.2, seconds, rate_qps, seed=1)
    override = _spend_with_overrides(PacingConfig(**common, request_lambda="override"), start,
                                     0.2, seconds, rate_qps, seed=1)
    assert floor / (target * seconds) == pytest.approx(1.0, abs=0.05)
    assert override / (target * seconds) > 1.5


def test_request_price_floor_only_while_lambda_is_paced():
    paced = Pacer(PacingConfig(target_usd_per_s=0.01), 5.0).state()
    assert paced.request_price(2.0) == (5.0, "config, paced (above the request's lambda 2)")
    assert paced.request_price(9.0) == (9.0, "request lambda")      # more frugal: taken
    assert paced.request_price(None) == (5.0, "config")
    for config in (PacingConfig(), PacingConfig(target_usd_per_s=0.01, request_lambda="override")):
        assert Pacer(config, 5.0).state().request_price(2.0) == (2.0, "request lambda")


def test_starting_price_from_the_latest_committed_manifest(tmp_path):
    for run_id, committed_at, lam in (("old", "2026-01-01T00:00:00+00:00", 3.0),
                                      ("new", "2026-02-01T00:00:00+00:00", 7.0)):
        commit(RunPaths(str(tmp_path), run_id), {"committed_at": committed_at, "solve": {
            "lambda": lam, "tie_cut": 0.25, "seed": 4}})
    (tmp_path / "uncommitted").mkdir()
    lam, tie_cut, seed, source, _ = starting_price(str(tmp_path), None)
    assert (lam, tie_cut, seed) == (7.0, 0.25, 4) and "new/manifest.json" in source
    assert starting_price(str(tmp_path / "old" / "manifest.json"), 9.0)[0] == 3.0
    assert starting_price(None, 9.0) == (9.0, 1.0, 0, "config", None)
    assert starting_price(None, None)[0] == 0.0
    with pytest.raises(R2RayError, match="no committed batch run"):
        starting_price(str(tmp_path / "uncommitted"), None)


def test_a_manifest_that_cannot_price_is_an_error_naming_it(tmp_path):
    """A run whose every row was quarantined (``solve: null``) given as the manifest was a
    TypeError, and a manifest that is not JSON a JSONDecodeError naming no file."""
    commit(RunPaths(str(tmp_path), "quarantined"), {"committed_at": "2026-01-01", "solve": None})
    with pytest.raises(R2RayError, match="quarantined/manifest.json has no solve"):
        starting_price(str(tmp_path / "quarantined" / "manifest.json"), None)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "manifest.json").write_text('{"solve": {"lamb')
    for manifest in (tmp_path, tmp_path / "torn" / "manifest.json"):
        with pytest.raises(R2RayError, match="torn/manifest.json is not a readable manifest"):
            starting_price(str(manifest), None)


def test_lambda_solved_for_another_model_or_catalogue_is_warned_when_loaded(tmp_path, caplog,
                                                                          monkeypatch):
    """λ* is quality per USD of one predictor's ĉ at one catalogue's prices: the ingress warns
    when the model it loads (at start, or swapped in when the alias moves) is another."""
    from r2ray.serving import deployments
    from r2ray.serving.deployments import Ingress
    from r2ray.serving.pacer import SolvedFor

    monkeypatch.setattr(deployments.logger, "handlers", [caplog.handler])  # Ray's: no propagation

    commit(RunPaths(str(tmp_path), "run"), {
        "committed_at": "2026-01-01", "solve": {"lambda": 3.0, "tie_cut": 1.0, "seed": 0},
        "model": {"label": "r2ray/3"}, "catalog_fingerprint": "c" * 64})
    start = starting_price(str(tmp_path), None)
    assert start.solved_for == SolvedFor("r2ray/3", "c" * 64)
    ingress = object.__new__(Ingress.func_or_class)
    ingress.book = SpendBook(Pacer(PacingConfig(), start.lam, source=start.source,
                                   solved_for=start.solved_for).state())
    for version, fingerprint, warned in (("r2ray/3", "c" * 64, None),
                                         ("r2ray/4", "c" * 64, "model r2ray/3, not r2ray/4"),
                                         ("r2ray/3", "d" * 64, "catalogue cccccccccccc, not dddd")):
        ingress.model = SimpleNamespace(version=version,
                                        catalog=SimpleNamespace(fingerprint=fingerprint))
        caplog.clear()
        ingress._check_price()
        assert (warned is None) == (caplog.text == ""), caplog.text
        assert warned is None or warned in caplog.text and "mispriced" in caplog.text



def test_a_restarted_pacers_new_run_reloads_the_model_with_that_runs_correction(monkeypatch):
    """A restarted Pacer reads the newest committed run of a manifest folder: the ingress priced
    at that run's λ* with ĉ corrected by the factors of the run it had loaded for (one run's
    price, another's costs; /healthz saw no mismatch, model and catalogue being the same)."""
    from r2ray.serving import deployments
    from r2ray.serving.pacer import SolvedFor

    loaded, new = (SolvedFor("r2ray/3", "c" * 64, correction=v) for v in ("C1", "C2"))

    async def one_interval(seconds):   # the watch loop's sleep: once, then stop
        slept.append(seconds)
        if len(slept) % 2 == 0:
            raise asyncio.CancelledError

    def load():   # as Ingress._load: ĉ corrected for the run whose λ* the Pacer serves now
        loads.append(ingress.book.state.solved_for)
        return SimpleNamespace(version="r2ray/3", catalog=SimpleNamespace(fingerprint="c" * 64),
                               priced_for=ingress.book.state.solved_for)

    monkeypatch.setattr(deployments.asyncio, "sleep", one_interval)
    ingress, loads, slept = object.__new__(deployments.Ingress.func_or_class), [], []
    ingress.config = serve_config({"model": "/models/m", "manifest": "/runs", "gc_freeze": False})
    ingress.book = SpendBook(Pacer(PacingConfig(), 3.0, solved_for=loaded).state())
    ingress._load, ingress.model = load, load()
    for pacer_run, expected in ((loaded, [loaded]), (new, [loaded, new])):
        ingress.book.acknowledge(Pacer(PacingConfig(), 7.0, solved_for=pacer_run).state())
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(ingress._watch())
        assert loads == expected and ingress.model.priced_for == pacer_run

def test_healthz_says_when_lambda_was_solved_for_another_model(routing_model):
    """The mismatch was only logged: an operator watching /healthz saw a healthy router pricing
    with another predictor's λ*."""
    from r2ray.serving.pacer import SolvedFor

    same = SolvedFor(routing_model.version, routing_model.catalog.fingerprint)
    for solved_for, expected in ((None, None), (same, None),
                                 (SolvedFor("r2ray/0", routing_model.catalog.fingerprint),
                                  f"model r2ray/0, not {routing_model.version}")):
        app = build_api(_service(routing_model, solved_for=solved_for), frozenset(),
                        max_request_bytes=20_000)
        assert _call(app, "GET", "/healthz").json()["price_mismatch"] == expected


# ---- schemas, config, auth -----------------------------------------------------------------------
def test_route_request_rejects_unknown_and_bad_fields_by_name():
    assert RouteRequest.model_validate({"query": "hi", "lambda": 2.5}).lam == 2.5
    for body, field in (({"query": "hi", "max_cost": 1}, "max_cost"),
                        ({"query": "hi", "lambda": -1}, "lambda"),
                        ({"query": ""}, "query"),
                        ({"query": "hi", "allowed_models": []}, "allowed_models"),
                        ({"query": "hi", "embedding": [0.1, float("nan")]}, "embedding")):
        with pytest.raises(ValidationError) as err:
            RouteRequest.model_validate(body)
        assert err.value.errors()[0]["loc"][0] == field


def test_chat_request_passes_unknown_openai_fields_and_rejects_what_cannot_work():
    request = ChatCompletionRequest.model_validate({
        "model": "r2ray", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2})
    assert request.model_extra == {"temperature": 0.2}
    for body, field in (({"model": "r2ray", "messages": [{"role": "user", "content": "hi"}],
                          "stream": True}, "stream"),
                        ({"model": "r2ray", "messages": [{"role": "system", "content": "x"}]},
                         "messages"),
                        ({"model": "r2ray", "messages": [{"role": "user", "content": "hi"}],
                          "r2ray": {"lamda": 1}}, "r2ray")):
        with pytest.raises(ValidationError) as err:
            ChatCompletionRequest.model_validate(body)
        assert err.value.errors()[0]["loc"][0] == field


def test_bearer_keys_401_403_and_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("R2RAY_TEST_KEYS", "alpha, beta")
    digests = load_key_digests(["R2RAY_TEST_KEYS"])
    assert digests == {key_digest("alpha"), key_digest("beta")}
    check_bearer("Bearer beta", digests)
    check_bearer(None, frozenset())                         # no keys configured: open
    for header, status in ((None, 401), ("Basic alpha", 401), ("Bearer ", 401),
                           ("Bearer gamma", 403)):
        with pytest.raises(AuthError) as err:
            check_bearer(header, digests)
        assert err.value.status == status and "gamma" not in str(err.value)
    monkeypatch.delenv("R2RAY_TEST_KEYS")
    with pytest.raises(R2RayError, match="R2RAY_TEST_KEYS"):
        load_key_digests(["R2RAY_TEST_KEYS"])


def test_serve_config_file_and_app_builder_are_valid(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    deploy = ServeDeploySchema.model_validate(document)
    app_args = deploy.applications[0].args
    assert deploy.applications[0].import_path == "serve.app:app"
    assert serve_config(app_args).pacing.target_usd_per_s > 0
    with pytest.raises(R2RayError, match="max_request_byte"):
        serve_config({"max_request_byte": 10})
    assert serve_config({}).encoder_precision == "auto"   # as the batch job's default
    with pytest.raises(R2RayError, match="encoder_precision"):
        serve_config({"encoder_precision": "float16"})
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("serve.app", None)
    from serve.app import app

    monkeypatch.setenv("R2RAY_TEST_KEYS", "k")
    built = app({"model": "models:/x@y", "lambda": "2", "api_key_envs": "R2RAY_TEST_KEYS"})
    assert type(built).__name__ == "Application"


# ---- the per-request token estimate agrees with the batch job's ----------------------------------
def test_scalar_token_estimate_agrees_with_the_array_rule_on_every_code_point():
    """Serve's one-string estimate prices a query as the batch job's Arrow rule does: each code
    point (surrogates aside) as the separator of six words, so a white space splits them."""
    texts = [chr(c).join("abcdef") for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    scalar = np.fromiter((estimate_tokens(t) for t in texts), np.int64, len(texts))
    np.testing.assert_array_equal(scalar, estimate_tokens_array(pa.array(texts, pa.string())))
    # both outcomes occur, so the check can fail either way: 6 words where white space splits,
    # else ⌈(6 + 5 × the separator's 1-4 UTF-8 bytes) / 4⌉
    assert set(scalar) == {3, 4, 6, 7}
    assert [estimate_tokens(t) for t in ("", None, "  ")] == [1, 1, 1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
                | st.sampled_from(["\u00a0", "\u3000", "\u2028", "\x85", "\x1c", " ", "\u200b",
                                   "模型", "naïve", "x" * 9]), max_size=30))
def test_scalar_token_estimate_agrees_with_the_array_rule(parts):
    texts = ["".join(parts), " ".join(parts), "\n".join(parts)]
    assert [estimate_tokens(t) for t in texts] == \
        list(estimate_tokens_array(pa.array(texts, pa.string())))


# ---- the decision path: online agrees with the batch solve ---------------------------------------
@pytest.fixture(scope="module")
def routing_model(small_routing_model):
    return RoutingModel(load_predictor(small_routing_model["path"]), None,
                        small_routing_model["catalog"], "test/1")


def _queries(catalog, n: int, seed: int, copies: int = 0) -> list[dict]:
    """Backlog rows with embeddings; the first 20 repeated ``copies`` times under new ids, so
    their hull steps tie exactly."""
    rows = synth_backlog(catalog, n, seed=seed, embeddings=True).to_pylist()
    return rows + [dict(r, query_id=f"{r['query_id']}-copy{k}")
                   for r in rows[:20] for k in range(copies)]


def _items(rows: list[dict], **price) -> list[RouteItem]:
    return [RouteItem(query=r["query"], input_tokens=r["input_tokens"],
                      key=query_key(r["query"], r["query_id"]), embedding=list(r["embedding"]),
                      **price) for r in rows]


def test_online_router_picks_the_batch_solves_arm_including_ties(routing_model):
    catalog = routing_model.catalog
    rows = _queries(catalog, 300, seed=5, copies=3)
    keys = np.array([query_key(r["query"], r["query_id"]) for r in rows], dtype=np.uint64)
    predictions = routing_model.predictor.predict(np.array([r["embedding"] for r in rows]))
    scores = arm_scores(predictions.quality, predictions.output_tokens, catalog,
                        np.array([r["input_tokens"] for r in rows]))
    steps = hull_steps(scores.quality, scores.cost_usd)
    # a budget that runs out half-way through the 4 tied copies of query 0's first step
    eff = steps.dq / steps.dc
    tied = eff == eff[steps.offsets[0]]
    budget = steps.base_c.sum() + steps.dc[eff > eff[steps.offsets[0]]].sum() \
        + 0.5 * steps.dc[tied].sum()
    solved = solve_budget(steps, budget, seed=7, query_key=keys)
    cert = solved.certificate
    assert tied.sum() == 4 and 0 < cert.theta < 1      # the tie rule decides between copies

    online = route_items(routing_model, _items(rows, lam=cert.lam, tie_cut=cert.tie_cut, seed=7))
    online_arms = np.array([catalog.arm_of(d.model, d.budget) for d in online])
    kept = ~solved.filled
    assert kept.sum() >= len(rows) - 2
    np.testing.assert_array_equal(online_arms[kept], solved.arm[kept])
    copies_taken = online_arms[[0, 300, 301, 302]] != steps.base_arm[[0, 300, 301, 302]]
    assert 0 < copies_taken.sum() < 4                   # some copies stepped up, some did not
    assert all(d.version == "test/1" and d.lam == cert.lam for d in online)


def test_serve_at_a_strict_budget_runs_lambda_picks_that_runs_arms(routing_model, tmp_path):
    """A --strict-budget run's λ* is the price of each arm's worst case at its cap (the costs its
    solve spent), not of ĉ: Serve started from its manifest prices the choice the same way, so a
    query gets the arm the run gave it. Before, Serve priced ĉ at that λ* (59 of 300 differed)."""
    catalog = routing_model.catalog
    rows = _queries(catalog, 300, seed=5)
    backlog = pa.Table.from_pylist([dict(r, tenant=None, order=i) for i, r in enumerate(rows)])
    scored = score_batch(backlog, routing_model.predictor, catalog, strict_budget=True)
    steps, _, keys, _ = table_to_steps(scored)
    solved = solve_budget(steps, steps.base_c.sum() + 0.5 * steps.dc.sum(), seed=7,
                          query_key=keys)
    cert = solved.certificate
    commit(RunPaths(str(tmp_path), "night"), {"committed_at": "2026-01-01T00:00:00+00:00",
                                              "spend": {"strict_budget": True},
                                              "solve": {"lambda": cert.lam, "seed": 7,
                                                        "tie_cut": cert.tie_cut}})
    start = starting_price(str(tmp_path), None)
    price = Pacer(PacingConfig(), start.lam, tie_cut=start.tie_cut, seed=start.seed,
                  source=start.source, solved_for=start.solved_for).state()
    items = [route_item(RouteRequest(query=r["query"], query_id=r["query_id"],
                                     embedding=list(r["embedding"])),
                        r["query"], r["input_tokens"], price, 0) for r in rows]
    online = np.array([d.arm for d in route_items(routing_model, items)])
    kept = ~solved.filled
    assert kept.sum() >= len(rows) - 3
    np.testing.assert_array_equal(online[kept], solved.arm[kept])
    lone = [route_items(routing_model, [items[i]])[0].arm for i in np.flatnonzero(kept)[:20]]
    assert lone == solved.arm[np.flatnonzero(kept)[:20]].tolist()   # the one-row path too
    at_c_hat = choose_arms(*_predicted(routing_model, rows), cert.lam, tie_cut=cert.tie_cut,
                           seed=7, query_key=keys)
    assert (at_c_hat != solved.arm).sum() > 10          # ĉ at this λ* would route otherwise


def _predicted(routing_model, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(q̂, ĉ USD) [N, K] of backlog rows, as ``arm_scores`` prices them."""
    predictions = routing_model.predictor.predict(np.array([r["embedding"] for r in rows]))
    scores = arm_scores(predictions.quality, predictions.output_tokens, routing_model.catalog,
                        np.array([r["input_tokens"] for r in rows]))
    return scores.quality, scores.cost_usd


def test_router_limits_hard_stop_and_rejections(routing_model):
    catalog = routing_model.catalog
    rows = _queries(catalog, 6, seed=8)
    free = route_items(routing_model, _items(rows, lam=0.0))
    stopped = route_items(routing_model, _items(rows, lam=0.0, stopped=True))
    for best, cheap in zip(free, stopped):
        assert cheap.c_hat_usd <= min(a["c_hat_usd"] for a in cheap.alternatives)
        assert cheap.c_hat_usd < best.c_hat_usd and cheap.reason.startswith("hard stop")
    limited = route_items(routing_model, _items(rows, lam=0.0, allowed_models=["Gemma-3-1B"],
                                                max_budget_tokens=100))
    assert {(d.model, d.budget <= 100, d.budget > 0) for d in limited} == {("Gemma-3-1B", True, True)}
    assert all(d.max_tokens <= 100 + 10 for d in limited)
    capped = route_items(routing_model, _items(rows, lam=0.0, max_cost_usd=2e-5))
    assert all(d.c_hat_usd <= 2e-5 for d in capped)
    bad = [RouteItem("q", 10, 1, 0.0, embedding=[0.0] * 5),
           RouteItem("q", 10, 1, 0.0),
           RouteItem("q", 10, 1, 0.0, embedding=rows[0]["embedding"], allowed_models=["gpt-9"]),
           RouteItem("q", 10, 1, 0.0, embedding=rows[0]["embedding"], max_cost_usd=1e-12)]
    results = route_items(routing_model, bad + _items(rows[:1], lam=0.0))
    assert [r.param for r in results[:4]] == ["embedding", "embedding", "allowed_models",
                                              "max_cost_usd"]
    assert all(isinstance(r, RouteRejected) for r in results[:4])
    travelled = pickle.loads(pickle.dumps(results[2]))  # replicas send them back pickled
    assert (travelled.param, str(travelled)) == ("allowed_models", str(results[2]))
    assert "384" in str(results[0]) and "Gemma-3-1B" in str(results[2])
    assert results[4].model                            # the good query in the batch still routes


def test_query_key_is_stable_and_prefers_the_id():
    assert query_key("hello") == 0x41700C479FA9F585          # pinned: keys must never change
    assert query_key("x", "q0-000000001") == 0xF8CA3486B030DB52
    assert query_key("hello") != query_key("hello!")
    assert query_key("a", "id-1") == query_key("b", "id-1") != query_key("a")
    assert 0 <= query_key("x") < 2**64


# ---- the HTTP API in process (no Ray, no sockets) ------------------------------------------------
def _service(routing_model, client: httpx.AsyncClient | None = None, solved_for=None,
             **config) -> RoutingService:
    async def route(item):
        return route_items(routing_model, [item])[0]

    async def describe():
        return {"version": routing_model.version, "models": routing_model.catalog.model_names,
                "catalog_fingerprint": routing_model.catalog.fingerprint,
                "encoder": None, "encoder_precision": None}

    book = SpendBook(PriceState(lam=0.0, tie_cut=1.0, seed=0, stopped=False, source="test",
                                solved_for=solved_for))
    return RoutingService(serve_config(config), route, book, describe, client)


def _call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ray") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def test_api_in_process_routes_counts_spend_and_maps_errors(routing_model):
    service = _service(routing_model)
    app = build_api(service, frozenset({key_digest("k1")}), max_request_bytes=20_000)
    auth = {"Authorization": "Bearer k1"}
    embedding = _queries(routing_model.catalog, 1, seed=3)[0]["embedding"]
    ok = _call(app, "POST", "/v1/route", headers=auth,
               json={"query": "What is 2+2?", "embedding": embedding, "tenant": "t1"})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["version"] == "test/1" and body["lambda"] == 0.0 and body["tenant"] == "t1"
    assert ok.headers["x-r2ray-model"] == body["model"] and len(body["alternatives"]) == 3
    assert service.book.take() == pytest.approx(body["c_hat_usd"])
    assert _call(app, "GET", "/healthz").json()["version"] == "test/1"
    models = _call(app, "GET", "/v1/models", headers=auth).json()
    assert [m["id"] for m in models["data"]][:2] == ["r2ray", "Gemma-3-1B"]
    for kwargs, status, param in (
            ({"json": {"query": "x"}}, 401, None),
            ({"json": {"query": "x"}, "headers": {"Authorization": "Bearer nope"}}, 403, None),
            ({"json": {"query": "x", "max_cost": 1}, "headers": auth}, 422, "max_cost"),
            ({"content": b"{not json", "headers": auth | {"content-type": "application/json"}},
             422, "body"),
            ({"content": b'{"query": "x"}', "headers": auth | {"content-type": "text/plain"}},
             422, "body"),
            ({"json": {"query": "x"}, "headers": auth}, 422, "embedding"),
            ({"json": {"query": "x" * 30_000}, "headers": auth}, 413, None)):
        response = _call(app, "POST", "/v1/route", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        error = response.json()["error"]
        assert error["message"] and (param is None or error["param"] == param)
    chat = _call(app, "POST", "/v1/chat/completions", headers=auth, json={
        "model": "r2ray", "messages": [{"role": "user", "content": "hi"}],
        "r2ray": {"embedding": embedding}})
    assert chat.status_code == 200 and chat.json()["object"] == "r2ray.route"  # no endpoints
    unknown = _call(app, "POST", "/v1/chat/completions", headers=auth, json={
        "model": "gpt-9", "messages": [{"role": "user", "content": "hi"}],
        "r2ray": {"embedding": embedding}})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "model"


def test_a_request_lambda_below_the_paced_price_is_routed_at_the_paced_price(routing_model):
    service = _service(routing_model)
    service.book = SpendBook(PriceState(lam=50.0, tie_cut=1.0, seed=0, stopped=False,
                                        source="config", floor=True))
    app = build_api(service, frozenset(), max_request_bytes=20_000)
    embedding = _queries(routing_model.catalog, 1, seed=3)[0]["embedding"]
    body = {"query": "What is 2+2?", "embedding": embedding}
    below = _call(app, "POST", "/v1/route", json=body | {"lambda": 0.0}).json()
    assert below["lambda"] == 50.0 and "above the request's lambda 0" in below["reason"]
    assert below["model"] == _call(app, "POST", "/v1/route", json=body).json()["model"]
    assert _call(app, "POST", "/v1/route", json=body | {"lambda": 80.0}).json()["lambda"] == 80.0


def test_in_flight_counts_the_http_requests_being_served():
    """The ingress routes a request inline only when it is the one request in flight."""
    seen, both_in = [], asyncio.Event()

    async def app(scope, receive, send):
        seen.append((scope["type"], counter.count))
        if scope["type"] == "http":
            if len(seen) == 3:
                both_in.set()
            await both_in.wait()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    counter = InFlight(app)

    async def go():
        await counter({"type": "lifespan"}, None, None)
        transport = httpx.ASGITransport(app=counter)
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ray") as client:
            return await asyncio.gather(client.get("/a"), client.get("/b"))

    assert [r.status_code for r in asyncio.run(go())] == [204, 204]
    assert seen == [("lifespan", 0), ("http", 1), ("http", 2)] and counter.count == 0


def test_upstream_body_keeps_the_conversation_and_caps_tokens(routing_model):
    embedding = _queries(routing_model.catalog, 1, seed=3)[0]["embedding"]
    request = ChatCompletionRequest.model_validate({
        "model": "r2ray", "temperature": 0.1, "max_tokens": 50, "r2ray": {"embedding": embedding},
        "messages": [{"role": "system", "content": "Be terse."},
                     {"role": "user", "content": [{"type": "text", "text": "Name a prime."}]}]})
    item = RouteItem("Name a prime.", 12, 1, 0.0, embedding=embedding, max_budget_tokens=50)
    decision = route_items(routing_model, [item])[0]
    body = upstream_body(request, decision)
    assert body["model"] == decision.model and body["temperature"] == 0.1 and "r2ray" not in body
    assert body["messages"][0] == {"role": "system", "content": "Be terse."}
    assert body["messages"][1]["content"].startswith("Name a prime.\n\nAnswer concisely")
    assert body["max_tokens"] <= 50
    headers = routing_headers(decision)
    assert headers["x-r2ray-version"] == "test/1" and all(v.isascii() for v in headers.values())


_FIRST_REQUEST = """
import json, sys
import numpy as np
from r2ray.serving.router import RouteItem, load_routing_model, route_items, warm_up
from tests.compiled_kernels import kernel_signatures

def signatures():
    return kernel_signatures(module for name, module in list(sys.modules.items())
                             if name.startswith("r2ray") and module)

model = load_routing_model(sys.argv[1], device="cpu")
if sys.argv[2] == "warm":
    warm_up(model)
before = signatures()
rng = np.random.default_rng(0)
for n in (1, 4):      # a lone request, then a batch
    route_items(model, [RouteItem(query="q", input_tokens=50, key=int(rng.integers(1 << 62)),
                                  lam=300.0, embedding=rng.standard_normal(
                                      model.embedding_dim).tolist()) for _ in range(n)])
print(json.dumps(sorted(k for k, v in signatures().items() if v - before.get(k, set()))))
"""


def test_warm_up_leaves_no_compiled_kernel_for_the_first_request(small_routing_model, tmp_path):
    """A Serve replica routes made-up queries while it starts (``router.warm_up``), so its
    first real requests, alone and batched, load or compile no kernel signature (~0.3 s on this
    host otherwise). Without the warm-up the same requests do: the check is not empty. On a
    numba cache of its own, filled by a first run."""
    import json
    import os
    import subprocess

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    fill, cold, warm = (json.loads(subprocess.run(
        [sys.executable, "-c", _FIRST_REQUEST, small_routing_model["path"], how],
        capture_output=True, text=True, check=True, cwd=REPO, env=env).stdout)
        for how in ("warm", "cold", "warm"))
    assert cold and warm == []


# ---- inputs that crashed a batch, booked absurd spend or lost content (a review, 2026-12-05) -----
@pytest.fixture(scope="module")
def embedding(routing_model):
    return list(synth_backlog(routing_model.catalog, 1, seed=3, embeddings=True)
                .to_pylist()[0]["embedding"])


def _app(service):
    return build_api(service, frozenset(), 1_000_000)


# ---- 1. input_tokens is unbounded: 500, a poisoned batch, or trillions of USD of "spend" ---------
def test_input_tokens_past_int64_is_a_422_naming_the_field(routing_model, embedding):
    app = _app(_service(routing_model))
    r = _call(app, "POST", "/v1/route",
             json={"query": "x", "embedding": embedding, "input_tokens": 10**19})
    assert r.status_code == 422, r.text                      # before the fix: 500
    assert r.json()["error"]["param"] == "input_tokens"


def test_input_tokens_near_int64_max_does_not_wrap_past_the_context_check(routing_model, embedding):
    service = _service(routing_model)
    r = _call(_app(service), "POST", "/v1/route",
             json={"query": "x", "embedding": embedding, "input_tokens": 2**63 - 1})
    # before the fix: 200, GLM-4.6 default arm, c_hat_usd 4.06e12 added to the spend book
    assert r.status_code == 422, r.text
    assert service.book.pending_usd == 0.0


def test_one_bad_item_does_not_fail_the_rest_of_its_batch(routing_model, embedding):
    good = RouteItem("x", 10, 1, 0.0, embedding=embedding)
    for bad in (RouteItem("y", 10**19, 2, 0.0, embedding=embedding),          # OverflowError
                RouteItem("y", 10, 2, 0.0, embedding=[1e39] * len(embedding))):  # EncoderError
        results = route_items(routing_model, [good, bad])   # before the fix: raises for both
        assert not isinstance(results[0], RouteRejected) and results[0].model
        assert isinstance(results[1], RouteRejected)
        assert results[1].param in ("input_tokens", "embedding")


def test_embedding_beyond_float32_is_a_422_naming_embedding(routing_model, embedding):
    r = _call(_app(_service(routing_model)), "POST", "/v1/route",
             json={"query": "x", "embedding": [1e39] * len(embedding)})
    assert r.status_code == 422, r.text                      # before the fix: 500
    assert r.json()["error"]["param"].startswith("embedding")


# ---- 2. a rejection names a limit that is not the cause ------------------------------------------
def test_rejection_names_the_limit_that_removed_the_arms(routing_model, embedding):
    # Gemma's context is 32,768 tokens: only allowed_models makes this unroutable; max_cost_usd=100
    # excludes nothing. Observed: param "max_cost_usd", "relax max_cost_usd".
    [result] = route_items(routing_model, [RouteItem(
        "x", 40_000, 1, 0.0, embedding=embedding, allowed_models=["Gemma-3-1B"],
        max_cost_usd=100.0)])
    assert isinstance(result, RouteRejected) and result.param == "allowed_models", result.param


def test_chat_rejection_names_max_tokens_not_a_field_the_request_lacks(routing_model, embedding):
    r = _call(_app(_service(routing_model)), "POST", "/v1/chat/completions", json={
        "model": "r2ray", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "r2ray": {"embedding": embedding}})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] == "max_tokens", error             # before the fix: "max_budget_tokens"
    assert "max_budget_tokens" not in error["message"]


# ---- 3. forwarded chat: realised cost from `usage` is trusted blindly ----------------------------
def _with_endpoints(routing_model):
    d = routing_model.catalog.to_dict()
    for m in d["models"]:
        m["endpoint"] = "http://llm.test/v1"
    return dataclasses.replace(routing_model, catalog=catalog_from_dict(d))


def _forwarding_service(routing_model, answer: bytes, sent: list):
    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return _service(_with_endpoints(routing_model), client)


CHAT = {"model": "r2ray", "messages": [{"role": "user", "content": "hi"}]}


def test_negative_usage_does_not_erase_other_requests_spend(routing_model, embedding):
    answer = b'{"choices": [], "usage": {"prompt_tokens": -1000000000, "completion_tokens": 1}}'
    service = _forwarding_service(routing_model, answer, [])
    service.book.add(0.5)                    # earlier requests' spend, not yet synced to the Pacer
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {"r2ray": {"embedding": embedding}})
    assert r.status_code == 200
    assert service.book.pending_usd >= 0.5   # before the fix: -439.5 (Pacer clamps the sum to 0)


def test_absurd_usage_is_not_a_500_after_the_upstream_answered(routing_model, embedding):
    answer = (b'{"choices": [], "usage": {"prompt_tokens": 1' + b"0" * 400
              + b', "completion_tokens": 1}}')
    service = _forwarding_service(routing_model, answer, [])
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {"r2ray": {"embedding": embedding}})
    assert r.status_code == 200, r.text      # before the fix: 500 (OverflowError), nothing counted
    assert 0 < service.book.pending_usd < 1  # falls back to c_hat


# ---- 3b. an upstream answer with a non-finite number (vLLM's -Infinity logprobs) is a 500 --------
def test_non_finite_number_in_the_upstream_answer_is_passed_through(routing_model, embedding):
    answer = (b'{"choices": [{"message": {"role": "assistant", "content": "4"}, "logprobs": '
              b'{"content": [{"token": "4", "logprob": -Infinity}]}}], '
              b'"usage": {"prompt_tokens": 3, "completion_tokens": 1}}')
    service = _forwarding_service(routing_model, answer, [])
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {"r2ray": {"embedding": embedding}})
    # before the fix: 500 (JSONResponse refuses -inf), the spend counted
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["content"][0]["logprob"] == -math.inf


# ---- 4. forwarded chat: non-text parts of the last user turn are dropped -------------------------
def test_image_part_of_the_user_turn_reaches_the_upstream(routing_model, embedding):
    sent = []
    service = _forwarding_service(routing_model, b'{"choices": []}', sent)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    r = _call(_app(service), "POST", "/v1/chat/completions", json={
        "model": "r2ray", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"}, image]}],
        "r2ray": {"embedding": embedding, "max_budget_tokens": 100}})
    assert r.status_code == 200
    content = sent[0]["messages"][0]["content"]
    # before the fix: a str, the image gone
    assert isinstance(content, list) and image in content, content
    assert "Answer concisely" in json.dumps(content)


def test_a_forwarded_chat_sends_the_prompt_and_cap_the_route_endpoint_renders(routing_model,
                                                                              embedding):
    """A chat of one user turn is forwarded with the messages and ``max_tokens`` that
    ``/v1/route`` answers for the same query (``routing.routed_request``, which the batch job's
    rows equal: tests/test_pipeline.py), byte for byte: the same input-token estimate, template
    and cap rule. Unicode edge cases: CJK, an emoji, a combining mark, a long unbroken token."""
    query = "模型 naïve 😀 e\u0301 " + "x" * 300
    options = {"embedding": embedding, "max_budget_tokens": 400}
    sent = []
    app = _app(_forwarding_service(routing_model, b'{"choices": []}', sent))
    routed = _call(app, "POST", "/v1/route", json={"query": query} | options).json()
    assert _call(app, "POST", "/v1/chat/completions", json={
        "model": "r2ray", "messages": [{"role": "user", "content": query}],
        "r2ray": options}).status_code == 200
    assert routed["budget"] > 0 and sent[0]["model"] == routed["model"]
    assert json.dumps(sent[0]["messages"]) == json.dumps(routed["messages"])
    assert sent[0]["max_tokens"] == routed["max_tokens"]


# ---- 5. a text part with "text": null is read as the word "None" ---------------------------------
def test_null_text_part_is_not_the_word_none():
    # before the fix: accepted, query "None". A ValidationError, the API's 422: not any Exception
    with pytest.raises(ValidationError, match="user message"):
        ChatCompletionRequest.model_validate({"model": "r2ray", "messages": [
            {"role": "user", "content": [{"type": "text", "text": None}]}]})


# ---- 6. a value of the wrong JSON type is coerced, not refused (a review, 2026-12-06) -------------
def test_wrong_json_types_in_routing_options_are_a_422_naming_the_field(routing_model, embedding):
    app = _app(_service(routing_model))
    for field, value in (("max_cost_usd", True), ("lambda", True), ("max_budget_tokens", "100"),
                         ("input_tokens", True)):
        r = _call(app, "POST", "/v1/route", json={"query": "x", "embedding": embedding,
                                                  field: value})
        # before the fix: 200, true read as a 1 USD ceiling or lambda 1, "100" as 100 tokens
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["param"] == field
    chat = _call(app, "POST", "/v1/chat/completions", json={
        "model": "r2ray", "messages": [{"role": "user", "content": "hi"}],
        "r2ray": {"embedding": [True] + embedding[1:]}})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "r2ray.embedding.0"
    ok = _call(app, "POST", "/v1/route", json={"query": "x", "embedding": embedding,
                                               "lambda": 2, "max_cost_usd": 1})
    assert ok.status_code == 200, ok.text      # a JSON integer is still a number


# ---- 7. an upstream redirect with a JSON body is the caller's 200 (a review, 2026-12-06) ---------
def test_upstream_redirect_is_a_502_saying_where_it_points_and_books_nothing(routing_model,
                                                                           embedding):
    def redirect(request):
        return httpx.Response(308, json={"detail": "moved"},
                              headers={"location": "https://llm.test/v1/chat/completions"})
    client = httpx.AsyncClient(transport=httpx.MockTransport(redirect))
    service = _service(_with_endpoints(routing_model), client)
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {"r2ray": {"embedding": embedding}})
    # before the fix: 200 with the body {"detail": "moved"} as the chat answer, c_hat booked
    assert r.status_code == 502, r.text
    assert "https://llm.test/v1" in r.json()["error"]["message"]
    assert service.book.pending_usd == 0.0   # not followed: the model never ran


# ---- 8. a named model outside the request's own allowed_models is called (a review, 2026-12-06) --
def test_chat_model_outside_its_own_allowed_models_is_a_422_naming_model(routing_model, embedding):
    sent = []
    service = _forwarding_service(routing_model, b'{"choices": []}', sent)
    app = _app(service)
    r = _call(app, "POST", "/v1/chat/completions", json=CHAT | {
        "model": "Gemma-3-1B", "r2ray": {"embedding": embedding, "allowed_models": ["GLM-4.6"]}})
    # before the fix: 200, Gemma-3-1B called and booked, allowed_models silently dropped
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "allowed_models" in error["message"], error
    assert sent == [] and service.book.pending_usd == 0.0
    ok = _call(app, "POST", "/v1/chat/completions", json=CHAT | {
        "model": "GLM-4.6", "r2ray": {"embedding": embedding, "allowed_models": ["GLM-4.6"]}})
    assert ok.status_code == 200 and sent[0]["model"] == "GLM-4.6", ok.text


# ---- 8b. a 200 whose body is an error object, not a chat completion (a review, 2026-12-06) ---
def test_upstream_200_with_an_error_body_is_a_502_quoting_it_and_books_c_hat(routing_model,
                                                                           embedding):
    answer = b'{"error": {"message": "provider overloaded", "code": 503}}'
    service = _forwarding_service(routing_model, answer, [])
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {"r2ray": {"embedding": embedding}})
    # before the fix: 200 with the error object as the chat answer (no choices)
    assert r.status_code == 502, r.text
    assert "no chat completion" in r.json()["error"]["message"]
    assert "provider overloaded" in r.json()["error"]["message"]
    assert service.book.pending_usd > 0   # a 2xx was accepted: it may be billed, so c_hat counts


# ---- 8c. max_tokens: true read as 1 (a review, 2026-12-06) ----------------------------------
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_boolean_token_cap_is_a_422_naming_it(routing_model, embedding, field):
    service = _forwarding_service(routing_model, b'{"choices": []}', [])
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {field: True, "r2ray": {"embedding": embedding}})
    # before: read as 1, then a 422 saying no arm has a length budget of at most 1 token
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and "not a boolean" in error["message"], error


# ---- 9. a NaN in a field passed through to the upstream is a 500 (a review, 2026-12-06) ---------
def test_non_finite_number_in_a_passed_through_field_is_a_422_naming_it(routing_model, embedding):
    sent = []
    service = _forwarding_service(routing_model, b'{"choices": []}', sent)
    app = _app(service)
    head = ('{"model": "r2ray", "r2ray": {"embedding": %s}, "messages": [{"role": "user", '
            % json.dumps(embedding))
    for body, param in (
            (head + '"content": "hi"}], "temperature": NaN}', "temperature"),
            (head + '"content": "hi"}], "logit_bias": {"15": -Infinity}}', "logit_bias.15"),
            (head + '"content": [{"type": "text", "text": "hi", "w": 1e999}]}]}',
             "messages.0.content.0.w")):
        r = _call(app, "POST", "/v1/chat/completions", content=body.encode(),
                  headers={"content-type": "application/json"})
        # before the fix: 500 (httpx writes strict JSON: "Out of range float values")
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param
    assert sent == [] and service.book.pending_usd == 0.0


# ---- 10. concurrent forwarded calls all route as if the spend limit were far (a review, 12-06) ---
def test_calls_in_flight_count_against_the_spend_limit(routing_model, embedding):
    limit, n = 0.01, 10
    arrived, release = [], asyncio.Event()

    async def slow_upstream(request):   # holds every call until all n have been routed
        arrived.append(request)
        if len(arrived) == n:
            release.set()
        await release.wait()
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 10,
                                                                   "completion_tokens": 1000}})
    client = httpx.AsyncClient(transport=httpx.MockTransport(slow_upstream))
    service = _service(_with_endpoints(routing_model), client,
                       pacing={"spend_limit_usd": limit})

    async def go():
        transport = httpx.ASGITransport(app=_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://r2ray") as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT | {
                "r2ray": {"embedding": embedding}}) for _ in range(n)))
    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * n
    stopped = sum("hard stop" in r.headers["x-r2ray-reason"] for r in responses)
    most = max(float(r.headers["x-r2ray-c-hat-usd"]) for r in responses)
    # before the fix: none stopped, 0.0176 USD spent against the 0.01 limit (sent one after
    # another the same calls stop at 0.0108)
    assert stopped > 0 and service.book.pending_usd <= limit + most, service.book.pending_usd
    assert service.book.in_flight == 0 and service.book.in_flight_usd == 0.0


# ---- 11. both length fields sent: the looser one is used and the other raised (a review, 12-06) --
def test_the_tighter_of_max_tokens_and_max_completion_tokens_binds(routing_model, embedding):
    sent = []
    app = _app(_forwarding_service(routing_model, b'{"choices": []}', sent))
    r = _call(app, "POST", "/v1/chat/completions", json=CHAT | {
        "max_tokens": 30, "max_completion_tokens": 5000, "r2ray": {"embedding": embedding}})
    # before the fix: routed under 5000, and the caller's max_tokens 30 sent as 4000
    assert r.status_code == 200, r.text
    assert int(r.headers["x-r2ray-budget"]) == 20, r.headers["x-r2ray-budget"]
    assert sent[0]["max_tokens"] <= 30 and sent[0]["max_completion_tokens"] <= 30, sent[0]
    r = _call(app, "POST", "/v1/chat/completions", json=CHAT | {
        "max_tokens": 5000, "max_completion_tokens": 5, "r2ray": {"embedding": embedding}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_completion_tokens", r.text


# ---- 12. an upstream 200 nested past json's depth limit is a 500, nothing booked (a review) ------
def test_upstream_answer_nested_too_deep_is_a_502_and_books_c_hat(routing_model, embedding):
    answer = b'{"choices": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    service = _forwarding_service(routing_model, answer, [])
    r = _call(_app(service), "POST", "/v1/chat/completions",
              json=CHAT | {"r2ray": {"embedding": embedding}})
    # before the fix: 500 (RecursionError in json.loads), and the accepted 2xx not booked
    assert r.status_code == 502, r.text
    assert "not JSON" in r.json()["error"]["message"]
    assert service.book.pending_usd > 0


# ---- 13. a malformed message content names pydantic's union members (a review, 2026-12-06) -----
@pytest.mark.parametrize("content", [{"text": "hi"}, [1, 2], 5,
                                     [{"type": "text", "text": "hi"}, "x"]])
def test_malformed_message_content_is_a_422_naming_the_content(routing_model, content):
    r = _call(_app(_service(routing_model)), "POST", "/v1/chat/completions", json={
        "model": "r2ray", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    # before the fix: param "messages.0.content.str", and a line per member of the union
    assert error["param"] == "messages.0.content", error
    assert "list of content parts" in error["message"] and "dict[" not in error["message"]
