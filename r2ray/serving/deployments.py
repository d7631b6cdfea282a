"""The Ray Serve deployments: a FastAPI ingress that also routes, a Pacer; and the app graph.

    HTTP → Ingress (auth, size limit, schema, forwarding, and the router itself: @serve.batch,
           │        one encoder + predictor call per batch, a lone request with an embedding
           │        routed inline; watches the registry alias and swaps versions between
           │        batches; N replicas)
           └─ Pacer.sync  (one replica: every ``price_sync_s`` each ingress reports the spend it
                           saw and gets λ back, so no request waits on the Pacer)

The router lives in the ingress replica on purpose: a second deployment costs every request one
more handle hop (proxy → ingress → router and back), which measured 8-13 ms on a 2-core machine,
more than the routing itself (about 1 ms with a precomputed embedding). Scale by replicas of the
one deployment (``router_replicas``, each with ``router_cpus`` / ``router_gpus``).

:class:`FloorIngress` is the smallest FastAPI ingress Serve runs (parse the body, answer): the
latency floor ``benchmarks/serve.py`` measures r2ray against, in the same run.

Metrics (Ray's Prometheus endpoint, next to Serve's own): ``r2ray_decisions`` per model, budget
and tenant; ``r2ray_spend_usd`` per model and tenant; the gauge ``r2ray_lambda``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from r2ray.redaction import redact_text
from r2ray.serving.api import InFlight, build_api
from r2ray.serving.auth import load_key_digests
from r2ray.serving.config import ServeConfig
from r2ray.serving.pacer import Pacer, PriceState, starting_price
from r2ray.serving.router import (RouteDecision, RouteItem, RouteRejected, load_routing_model,
                                  route_items, warm_up)
from r2ray.serving.service import NullMetrics, RoutingService, SpendBook, sync_spend
from r2ray.serving.upstream import upstream_client

logger = logging.getLogger("ray.serve")
INGRESS_MAX_ONGOING = 256   # requests per ingress replica; they are I/O-bound awaits


@serve.deployment(num_replicas=1)
class PacerDeployment:
    """Holds λ (one replica: the spend books must be in one place)."""

    def __init__(self, config: dict):
        config = ServeConfig.model_validate(config)
        start = starting_price(config.manifest, config.lam, config.tie_cut, config.seed)
        self.pacer = Pacer(config.pacing, start.lam, tie_cut=start.tie_cut, seed=start.seed,
                           source=start.source, now=time.monotonic(), solved_for=start.solved_for)
        self.gauge = metrics.Gauge("r2ray_lambda", description="price of budget, quality per USD")
        self.gauge.set(self.pacer.lam)
        logger.info("pacer starts at lambda=%.6g from %s", start.lam, start.source)

    async def sync(self, ingress: str, seq: int, spend_usd: float, queries: int) -> PriceState:
        """Add an ingress's spend (USD) over the ``queries`` it booked since its last sync unless
        this ``seq`` from that ingress was applied already (a resend after a lost reply); the
        current price."""
        self.pacer.report(ingress, seq, spend_usd, time.monotonic(), queries)
        self.gauge.set(self.pacer.lam)
        return self.pacer.state()


class ServeMetrics(NullMetrics):
    """Prometheus counters through Ray Serve's metrics (tagged with deployment and replica)."""

    def __init__(self):
        self.decisions = metrics.Counter("r2ray_decisions", description="routed queries",
                                         tag_keys=("model", "budget", "tenant"))
        self.spent = metrics.Counter("r2ray_spend_usd", description="spend counted for pacing, USD",
                                     tag_keys=("model", "tenant"))

    def decision(self, decision: RouteDecision, tenant: str | None) -> None:
        self.decisions.inc(tags={"model": decision.model, "budget": str(decision.budget),
                                 "tenant": tenant or ""})

    def spend(self, cost_usd: float, model: str, tenant: str | None) -> None:
        if cost_usd > 0:
            self.spent.inc(cost_usd, tags={"model": model, "tenant": tenant or ""})


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress()
class Ingress:
    """HTTP front and router: the FastAPI app of :mod:`r2ray.serving.api` over a
    :class:`RoutingService` whose route function is this replica's batching ``route``."""

    async def __init__(self, pacer: DeploymentHandle, config: dict, key_digests: list[str]):
        self.config = ServeConfig.model_validate(config)
        self.pacer = pacer
        self.key_digests = frozenset(key_digests)
        self.ingress_id = uuid.uuid4().hex   # names this replica's syncs to the Pacer
        # the price first: the run whose λ* it is names the cost correction the model loads with
        self.book = SpendBook(await pacer.sync.remote(self.ingress_id, 0, 0.0, 0))
        self.model = await asyncio.to_thread(self._load)
        self.route.set_max_batch_size(self.config.batch_max_size)
        self.route.set_batch_wait_timeout_s(self.config.batch_wait_s)
        self._check_price()
        self.service = RoutingService(self.config, self._route_one, self.book, self._describe,
                                      upstream_client(INGRESS_MAX_ONGOING), ServeMetrics())
        self.in_flight = InFlight(build_api(self.service, self.key_digests,
                                            self.config.max_request_bytes))
        self._syncer = asyncio.create_task(self._sync_prices())
        self._watcher = asyncio.create_task(self._watch())
        self._freeze_heap()

    def _freeze_heap(self) -> None:
        """Collect once, then ``gc.freeze()``: the replica's heap after loading (Ray, Serve,
        FastAPI, torch, the model: ~860k objects) is permanent, and every full collection
        walked all of it (748 ms measured), a pause any request that arrived then waited out.
        Frozen objects are never collected, so a version swap unfreezes and collects again."""
        if self.config.gc_freeze:
            gc.collect()
            gc.freeze()

    def __serve_build_asgi_app__(self):
        return self.in_flight

    def _load(self):
        """The configured model version, loaded and warmed (``router.warm_up``), its ĉ priced
        with the cost correction of the run whose λ* is served (``router.served_correction``)."""
        c = self.config
        model = load_routing_model(c.model, c.tracking_uri, c.catalog, c.device,
                                   corrections=c.corrections_root(), precision=c.encoder_precision,
                                   solved_for=self.book.state.solved_for)
        warm_up(model)
        return model

    def _check_price(self) -> None:
        """Warn when the starting λ* was solved for another model version or catalogue than the
        one loaded (the alias moved past the newest batch run, or ``catalog`` reprices): it is
        quality per USD of another predictor's ĉ, so decisions are mispriced until pacing
        moves λ or a batch run for this version commits. Served still: refusing would leave
        the endpoint dead until then; ``/healthz`` says so as ``price_mismatch``."""
        differs = self.book.state.mismatch(self.model.version, self.model.catalog.fingerprint)
        if differs is not None:
            logger.warning("lambda from %s was solved for %s: decisions are mispriced until "
                           "pacing moves it or a batch run of this model commits",
                           self.book.state.source, differs)

    async def _route_one(self, item: RouteItem) -> RouteDecision | RouteRejected:
        """A request that brings its embedding and is the only HTTP request open in the replica
        (``InFlight``: a forwarded chat still waiting on its upstream counts too, so under chat
        traffic this shortcut rarely applies and the batch path, as before it, is taken) is
        routed inline: with no batch wait, the batch it would form is itself, and the batch queue's hop (a
        task, an event, a future: ~0.7 ms CPU and ~2 ms p50 on the loaded 2-core host) buys
        nothing. Text goes through the batch always: an encoder call is worth sharing, and
        the hop's yield lets requests that arrived meanwhile join it (inline-when-alone text
        cost 7% of the throughput at 32 clients). So do requests with others in flight, or
        with ``batch_wait_s`` set."""
        if item.embedding is not None and self.in_flight.count <= 1 \
                and self.config.batch_wait_s == 0:
            return route_items(self.model, [item])[0]
        return await self.route(item)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def route(self, items: list[RouteItem]) -> list:
        # Runs on the replica's loop on purpose: requests that arrive meanwhile queue up and
        # form the next batch. A version swap replaces self.model, never the one used here.
        return route_items(self.model, items)

    async def _describe(self) -> dict:
        return {"version": self.model.version, "models": self.model.catalog.model_names,
                "catalog_fingerprint": self.model.catalog.fingerprint,
                "embedding_dim": self.model.embedding_dim,
                "encoder": None if self.model.encoder is None else self.model.encoder.name,
                "encoder_precision": None if self.model.encoder is None
                else self.model.encoder.precision,
                "cost_correction": self.model.correction}

    async def _watch(self) -> None:
        """Every ``watch_interval_s``, load the model again when it is stale (``_stale``) beside
        the one serving, then swap the reference (in-flight batches keep the old one)."""
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            try:
                why = await asyncio.to_thread(self._stale)
                if why is not None:
                    fresh = await asyncio.to_thread(self._load)
                    logger.info("model %s: swapping %s for %s (%s)", self.config.model,
                                self.model.version, fresh.version, why)
                    self.model = fresh
                    self._check_price()
                    if self.config.gc_freeze:   # let the old version's cycles be collected
                        gc.unfreeze()
                        self._freeze_heap()
            except Exception as err:  # keep serving the loaded version; say why
                logger.warning("model %s: check or reload failed, keeping %s: %s",
                               self.config.model, self.model.version, redact_text(str(err)))

    def _stale(self) -> str | None:
        """Why the loaded model must be loaded again, in words (None: it is current):
        ``models:/NAME@ALIAS`` names another version now, or the Pacer prices with another
        batch run's λ* than the run its cost correction was chosen for (a restarted Pacer reads
        the newest run of a manifest folder), which paired one run's λ* with another's ĉ."""
        from r2ray.registry import resolve_version

        if self.config.model.startswith("models:/"):
            found = resolve_version(self.config.model, self.config.tracking_uri)
            if f"{found.name}/{found.version}" != self.model.version:
                return f"the alias names {found.name}/{found.version}"
        if self.config.corrections_root() is not None \
                and self.book.state.solved_for != self.model.priced_for:
            return "lambda is another batch run's, whose cost correction ĉ needs"
        return None

    async def _sync_prices(self) -> None:
        """Report spend and fetch λ every ``price_sync_s``; on failure keep the last price."""
        while True:
            await asyncio.sleep(self.config.price_sync_s)
            try:
                await self._sync_once()
            except Exception as err:   # the sync stays in the book and is sent again
                logger.warning("pacer sync failed, keeping lambda=%.6g: %s", self.book.state.lam,
                               err)

    async def _sync_once(self) -> PriceState:
        return await sync_spend(self.book, self.ingress_id,
                                lambda *args: self.pacer.sync.remote(*args))

    async def __del__(self):
        """Serve calls this when the replica shuts down: stop the loop, then report the spend
        the Pacer has not acknowledged, so a scale-down or redeploy does not lose it."""
        if getattr(self, "_syncer", None) is None:   # __init__ did not finish
            return
        self._syncer.cancel()
        try:
            await asyncio.wait_for(self._sync_once(), timeout=self.config.price_sync_s * 8)
        except Exception as err:
            logger.warning("last pacer sync failed, %.6g USD unreported: %s",
                           self.book.unreported_usd, err)


FLOOR_API = FastAPI(title="Serve floor")


@FLOOR_API.post("/v1/route")
async def _floor_route(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"object": "floor", "fields": len(body)})


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress(FLOOR_API)
class FloorIngress:
    """Ray Serve's own floor: one FastAPI deployment whose one route parses the JSON body and
    answers with a small JSON object, nothing else (no auth, schema, model or metrics)."""


def build_application(config: ServeConfig):
    """The bound Serve application for ``config`` (nothing starts until it is run)."""
    settings = config.model_dump()
    digests = sorted(load_key_digests(config.api_key_envs))
    pacer = PacerDeployment.options(  # no access log: every ingress syncs a few times a second
        ray_actor_options={"num_cpus": config.pacer_cpus},
        logging_config={"enable_access_log": False}).bind(settings)
    return Ingress.options(
        num_replicas=config.router_replicas,
        ray_actor_options={"num_cpus": config.router_cpus, "num_gpus": config.router_gpus},
    ).bind(pacer, settings, digests)


def build_floor_application():
    """The bound :class:`FloorIngress` application (for benchmarks)."""
    return FloorIngress.options(ray_actor_options={"num_cpus": 0.1}).bind()
