"""Per-request routing: embedding → predictions → the batch job's decision rule → a decision.

The decision is the one shared path (STYLE 8): :func:`r2ray.routing.arm_scores` prices and masks
the arms, :func:`r2ray.solver.choose_arms` picks the arm the batch solve's rule picks at price λ
(the same hull, the same tie hash, the same cut), :func:`r2ray.routing.routed_request` renders it.
So with the batch run's λ*, ``tie_cut`` and ``seed``, and the same query keys, a query gets the
arm the batch solve gave it (unless the solve's greedy fill moved it).

**Query key** (what the tie hash reads): the first 8 bytes, little-endian, of BLAKE2b over
``"id:" + query_id`` when the request names a ``query_id``, else over ``"text:" + query``. It is
stable across processes, machines and versions (:func:`r2ray.routing.query_key`); the batch job
hashes the same keys, so ties break the same way online.

Nothing here knows about Ray: the Serve Router deployment calls :func:`route_items` on batches.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np

from r2ray import storage
from r2ray.catalog import DEFAULT_BUDGET, Catalog, ModelSpec, UnknownModel, repriced_catalog
from r2ray.encoders import embed_or_encode
from r2ray.errors import R2RayError
from r2ray.redaction import redact_uri
from r2ray.routing import (ArmScores, allowed_arms, arm_caps, arm_scores, routed_request,
                           solve_costs, worst_case_usd)
from r2ray.serving.pacer import SolvedFor
from r2ray.serving.schema import MAX_INPUT_TOKENS
from r2ray.solver import NO_ARM, choose_arm, choose_arms

logger = logging.getLogger(__name__)


class RouteRejected(R2RayError, ValueError):
    """One query cannot be routed as asked; ``param`` names the request field to change."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keeps `param` when pickled (Ray results, process pools)
        return type(self), (self.param, str(self))


@dataclass(frozen=True)
class RoutingModel:
    """One loaded model version: predictor, its encoder (None: embeddings must be sent), prices."""

    predictor: object          # r2ray.predictor.BasePredictor
    encoder: object | None     # r2ray.encoders.Encoder
    catalog: Catalog
    version: str               # "NAME/VERSION" from the registry, or the folder it came from
    cost_factors: np.ndarray | None = None  # [K] ĉ multipliers of the latest reconciliation
    correction: str | None = None           # its version, for /v1/models and logs
    priced_for: SolvedFor | None = None     # the served run its correction was chosen for
                                            # (served_correction); None: none served

    @property
    def embedding_dim(self) -> int:
        return int(self.predictor.embedding_dim_)


def load_routing_model(uri: str, tracking_uri: str | None = None, catalog_path: str | None = None,
                       device: str | None = None, corrections: str | None = None,
                       precision: str = "auto", solved_for: SolvedFor | None = None
                       ) -> RoutingModel:
    """Load ``models:/NAME@ALIAS`` (or a folder) with its encoder; ``catalog_path`` may change
    prices and endpoints, never the arms the model was trained on. ``corrections``: a batch
    output folder whose ``r2ray reconcile`` factors price ĉ (:func:`served_correction`, for the
    run ``solved_for`` names). ``precision``: the text encoder's forward pass
    (:func:`r2ray.encoders.load_encoder`; ``auto``, as the batch job's default)."""
    from r2ray.encoders import default_device, model_encoder
    from r2ray.registry import load_registered
    device = device or default_device()
    bundle = load_registered(uri, tracking_uri, device=device)
    catalog = bundle.catalog if catalog_path is None else \
        repriced_catalog(catalog_path, bundle.catalog, uri)
    encoder = model_encoder(bundle.encoder_spec, bundle.predictor.encoder_fingerprint, uri,
                            device=device, precision=precision)
    version = storage.canonical_uri(uri) if bundle.version is None else \
        f"{bundle.version.name}/{bundle.version.version}"   # a folder: as the batch job labels it
    correction = None if corrections is None else served_correction(
        corrections, version, catalog.fingerprint, bundle.predictor.saved_fingerprint_, solved_for)
    return RoutingModel(bundle.predictor, encoder, catalog, version,
                        None if correction is None else correction.factors_for(catalog),
                        None if correction is None else correction.version, solved_for)


def served_correction(root: str, version: str, catalog_fingerprint: str,
                      model_fingerprint: str | None, solved_for: SolvedFor | None):
    """The cost correction under the batch output ``root`` that prices Serve's ĉ: the one the
    run whose λ* is served priced its own ĉ with (none where it applied none), so Serve and that
    run choose alike at λ*; the newest for this model version and catalogue where λ* is another
    model's or catalogue's (already mispriced: ``price_mismatch``), where no run is served, or
    where the run's own correction is gone (with a warning)."""
    from r2ray.reconcile.correction import latest_correction

    newest = functools.partial(latest_correction, root, version, catalog_fingerprint,
                               model_fingerprint)
    if solved_for is None or solved_for.correction is None \
            or solved_for.mismatch(version, catalog_fingerprint) is not None:
        return newest()
    if solved_for.correction == "":
        return None
    found = newest(version=solved_for.correction)
    if found is None:
        logger.warning("cost correction %s, which priced the served run, is not under %s: "
                       "pricing with the newest for %s", solved_for.correction,
                       redact_uri(root), version)
        return newest()
    return found


@dataclass(frozen=True)
class RouteItem:
    """One query as the router sees it: text, limits, and the price to route it at."""

    query: str
    input_tokens: int
    key: int                                   # query_key(...)
    lam: float                                 # quality per USD
    tie_cut: float = 1.0
    seed: int = 0
    stopped: bool = False                      # hard stop: cheapest arm
    strict_budget: bool = False                # λ is a --strict-budget run's: arms are priced
                                               # at their worst case (routing.solve_costs)
    price_source: str = "config"
    embedding: list[float] | None = None
    allowed_models: list[str] | None = None
    max_budget_tokens: int | None = None
    max_output_tokens: int | None = None       # the caller's own cap (chat's max_tokens)
    max_cost_usd: float | None = None          # USD the arm may cost at its hard cap
    n_alternatives: int = 3


@dataclass(frozen=True)
class RouteDecision:
    model: str
    budget: int                  # output tokens, 0 = default
    messages: list[dict]
    max_tokens: int
    q_hat: float
    t_hat_tokens: float
    c_hat_usd: float
    lam: float
    reason: str
    version: str
    input_tokens: int
    arm: int
    spec: ModelSpec | None = None  # the chosen model's prices and endpoint, in this version
    alternatives: list[dict] = field(default_factory=list)


def route_items(model: RoutingModel, items: list[RouteItem]) -> list[RouteDecision | RouteRejected]:
    """Route a batch: one encoder and one predictor call for all, the decision per price group.

    A query that cannot be routed gets a :class:`RouteRejected` in its place; the rest go on.
    """
    out: list[RouteDecision | RouteRejected | None] = [None] * len(items)
    masks = {}
    for i, item in enumerate(items):
        try:
            masks[i] = _allowed(model, item)
        except RouteRejected as rejected:
            out[i] = rejected
    rows = list(masks)
    if rows:
        batch = [items[i] for i in rows]
        scores = predict_scores(model, batch, np.stack([masks[i] for i in rows]))
        for i, result in zip(rows, decide(model, scores, batch)):
            out[i] = result
    return out


def warm_up(model: RoutingModel) -> None:
    """Route made-up queries, one alone and two together, before the first real request: the
    first call in a process loads the decision's compiled kernels (numba's cache, or a compile
    where there is none), runs torch's first forward pass and the encoder's, ~0.3-0.4 s on a
    2-core host against ~1 ms after. A Serve replica does this while it starts, and again for
    a version it swaps in, so no request waits for it."""
    dim = model.embedding_dim
    items = [RouteItem(query="warm-up", input_tokens=1, key=key, lam=1.0,
                       embedding=None if model.encoder is not None else [0.0] * dim)
             for key in (0, 1)]
    route_items(model, items[:1])       # a lone request: the one-row path
    route_items(model, items)           # a batch


def _allowed(model: RoutingModel, item: RouteItem) -> np.ndarray:
    """[K] arm mask of the request's limits; checks what can be checked before predicting."""
    if item.embedding is None and model.encoder is None:
        raise RouteRejected("embedding", f"model {model.version} has no text encoder (trained on "
                            f"precomputed embeddings): send `embedding` with "
                            f"{model.embedding_dim} floats")
    if item.embedding is not None and len(item.embedding) != model.embedding_dim:
        raise RouteRejected("embedding", f"embedding has {len(item.embedding)} values; model "
                            f"{model.version} expects {model.embedding_dim}")
    # checked per item here: past this point an error fails every request in the batch
    if not 0 < item.input_tokens <= MAX_INPUT_TOKENS:
        raise RouteRejected("input_tokens",
                            f"input_tokens must be between 1 and {MAX_INPUT_TOKENS}")
    if item.embedding is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(np.asarray(item.embedding, dtype=np.float32)).all()
        if not finite:
            raise RouteRejected("embedding", "embedding values must be finite float32 numbers")
    try:
        mask = allowed_arms(model.catalog, item.allowed_models, item.max_budget_tokens)
    except UnknownModel as err:
        raise RouteRejected("allowed_models", str(err)) from None
    if item.max_output_tokens is not None:
        mask &= within_output_cap(model.catalog, item.input_tokens, item.max_output_tokens)
    return mask


def within_output_cap(catalog: Catalog, input_tokens: int, cap: int) -> np.ndarray:
    """[K] arms a caller's own output cap (tokens) leaves whole: a budgeted arm whose budget is
    at most ``cap``, a default arm whose hard ``max_tokens`` is (so a client's habitual
    ``max_tokens: 4096`` does not remove the uncapped arms, whose cap is 4,000)."""
    budgets = catalog.arm_arrays["budget_tokens"]
    caps = arm_caps(catalog, np.array([input_tokens], dtype=np.int64))[0]
    return np.where(budgets == DEFAULT_BUDGET, caps <= cap, budgets <= cap)


def embeddings(model: RoutingModel, items: list[RouteItem]) -> np.ndarray:
    """[N, D] float32: the sent embeddings, the encoder's for the rest (one encoder call)."""
    given = np.full((len(items), model.embedding_dim), np.nan, dtype=np.float32)
    for i, item in enumerate(items):
        if item.embedding is not None:
            given[i] = item.embedding
    return embed_or_encode([item.query for item in items], given, model.encoder,
                           model.embedding_dim)


def predict_scores(model: RoutingModel, items: list[RouteItem], allowed: np.ndarray) -> ArmScores:
    """Predictions priced and masked by the shared ``arm_scores`` (context, NaN, ``allowed``
    [N, K]), then arms that could cost more than a request's ``max_cost_usd`` masked too."""
    predictions = model.predictor.predict(embeddings(model, items))
    input_tokens = np.array([item.input_tokens for item in items], dtype=np.int64)
    scores = arm_scores(predictions.quality, predictions.output_tokens, model.catalog,
                        input_tokens, allowed, cost_factors=model.cost_factors)
    if all(i.max_cost_usd is None for i in items):
        return scores   # arm_scores already masks what a NaN cost would (most requests)
    max_cost = np.array([math.inf if i.max_cost_usd is None else i.max_cost_usd for i in items])
    over = ~(scores.cost_usd <= max_cost[:, None]) | ~within_cost(model.catalog, input_tokens,
                                                                     max_cost)
    return ArmScores(np.where(over, np.nan, scores.quality).astype(np.float32),
                     np.where(over, np.nan, scores.output_tokens).astype(np.float32),
                     np.where(over, np.nan, scores.cost_usd))


def within_cost(catalog: Catalog, input_tokens: np.ndarray,
                max_cost_usd: np.ndarray) -> np.ndarray:
    """[N, K] arms whose bill at their hard cap (``routing.worst_case_usd``: input tokens × p_in
    + ``max_tokens`` × p_out, USD) is within each request's ``max_cost_usd``: a ceiling on what
    the request can cost, not on its prediction ĉ, which the answer may exceed."""
    return worst_case_usd(catalog, input_tokens) <= max_cost_usd[:, None]


def decide(model: RoutingModel, scores: ArmScores,
           items: list[RouteItem]) -> list[RouteDecision | RouteRejected]:
    """``choose_arms`` once per distinct (price, tie cut, seed, cost basis); a hard stop prices
    at +inf, which leaves every query on its (predicted) cheapest arm. At a strict-budget run's
    λ the choice prices arms at their worst case, as that run's solve did (``solve_costs``)."""
    prices = np.array([math.inf if i.stopped else i.lam for i in items])
    strict = np.array([i.strict_budget and not i.stopped for i in items])
    priced = scores.cost_usd if not strict.any() else np.where(
        strict[:, None], solve_costs(scores, model.catalog, np.array(
            [i.input_tokens for i in items], dtype=np.int64), strict_budget=True), scores.cost_usd)
    arms = np.full(len(items), NO_ARM, dtype=np.int64)
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((prices[i], item.tie_cut, item.seed), []).append(i)
    for (lam, tie_cut, seed), rows in groups.items():
        if len(rows) == 1:   # a lone request: the one-row path (same arm, a fifth of the cost)
            arms[rows[0]] = choose_arm(scores.quality[rows[0]], priced[rows[0]], lam,
                                       tie_cut=tie_cut, seed=seed, query_key=items[rows[0]].key)
            continue
        keys = np.array([items[i].key for i in rows], dtype=np.uint64)
        arms[rows] = choose_arms(scores.quality[rows], priced[rows], lam,
                                 tie_cut=tie_cut, seed=seed, query_key=keys)
    return [_decision(model, scores, i, int(arms[i]), item, priced[i])
            for i, item in enumerate(items)]


def _decision(model: RoutingModel, scores: ArmScores, row: int, arm: int,
              item: RouteItem, priced: np.ndarray) -> RouteDecision | RouteRejected:
    """``priced``: the row's costs (USD) the choice spent, which rank its alternatives."""
    if arm == NO_ARM:
        return _no_arm(model, item)
    routed = routed_request(item.query, arm, model.catalog, item.input_tokens)
    reason = ("hard stop: spend limit reached, cheapest arm" if item.stopped else
              f"best value q - lambda*c on the quality/cost hull at lambda={item.lam:.6g} "
              f"({item.price_source})")
    return RouteDecision(
        model=routed["model"], budget=routed["budget"], messages=routed["messages"],
        max_tokens=routed["max_tokens"], q_hat=float(scores.quality[row, arm]),
        t_hat_tokens=float(scores.output_tokens[row, arm]),
        c_hat_usd=float(scores.cost_usd[row, arm]), lam=float(item.lam), reason=reason,
        version=model.version, input_tokens=item.input_tokens, arm=arm,
        spec=model.catalog.model(routed["model"]),
        alternatives=alternatives(model.catalog, scores, row, arm,
                                  math.inf if item.stopped else item.lam, item.n_alternatives,
                                  priced))


def _no_arm(model: RoutingModel, item: RouteItem) -> RouteRejected:
    """The rejection of a query left with no arm, naming the limit that removed them: the first
    that alone excludes every arm the query could use without limits (the query itself when no
    arm could answer it at all). Scores the one query again: this is the error path."""
    catalog = model.catalog
    free = predict_scores(model, [replace(item, allowed_models=None, max_budget_tokens=None,
                                          max_output_tokens=None, max_cost_usd=None)],
                          np.ones((1, catalog.n_arms), dtype=bool))
    usable = np.isfinite(free.cost_usd[0])
    if not usable.any():
        return RouteRejected("query", "no arm can answer this query (too long for every context "
                             "window, or no valid prediction)")
    limits = {}
    if item.max_cost_usd is not None:
        limits["max_cost_usd"] = within_cost(catalog, np.array([item.input_tokens]),
                                             np.array([item.max_cost_usd]))[0]
    if item.max_budget_tokens is not None:
        limits["max_budget_tokens"] = allowed_arms(catalog, None, item.max_budget_tokens)
    if item.max_output_tokens is not None:
        limits["max_output_tokens"] = within_output_cap(catalog, item.input_tokens,
                                                        item.max_output_tokens)
    if item.allowed_models is not None:
        limits["allowed_models"] = allowed_arms(catalog, item.allowed_models)
    for param, mask in limits.items():
        if not (usable & mask).any():
            return RouteRejected(param, f"no arm satisfies the request's limits; relax {param}")
    names = list(limits) or ["query"]
    return RouteRejected(names[0], f"no arm satisfies {', '.join(names)} together; relax one")


def alternatives(catalog: Catalog, scores: ArmScores, row: int, chosen: int, lam: float,
                 n: int, priced: np.ndarray | None = None) -> list[dict]:
    """The next best usable arms after ``chosen``, by value q̂ − λ·c (by cost under a hard stop),
    c the costs the choice spent (``priced``, USD [K]; None: ĉ); each reports its ĉ."""
    q, c, t = scores.quality[row], scores.cost_usd[row], scores.output_tokens[row]
    spent = c if priced is None else priced
    value = -spent if math.isinf(lam) else q - lam * spent
    usable = np.flatnonzero(np.isfinite(value) & (np.arange(len(q)) != chosen))
    ranked = usable[np.lexsort((-q[usable], -value[usable]))][:n]
    return [{"model": catalog.arms[j].model, "budget": int(catalog.arms[j].budget_tokens),
             "q_hat": float(q[j]), "t_hat_tokens": float(t[j]), "c_hat_usd": float(c[j]),
             "value": float(value[j])} for j in ranked]
