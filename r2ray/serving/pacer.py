"""Online spend pacing: the price λ (quality per USD) moved so spend tracks a target rate.

Once per window of ``window_s`` seconds::

    λ ← clamp(λ · exp(η · (min(spend_rate / target_rate, max_ratio) − 1)), λ_min, λ_max)

Spending faster than the target raises λ (cheaper arms win), slower lowers it. This is a
multiplicative (log-space integral) dual update, so the *average* spend rate converges to the
target even when query difficulty drifts. A window in which no query was booked (not even a
free one) leaves λ where it is: it says nothing of the price, and an idle hour of such windows
took λ from λ* to λ_min, every query after it to the dearest arms until λ climbed back. Two
hard stops send every query to its cheapest arm: a window that has already spent
``hard_stop_ratio`` × its share, and a total ``spend_limit_usd``.

:class:`Pacer` is pure: time is passed in (seconds, any monotonic clock), so tests can simulate
hours of traffic in milliseconds. The Serve ``Pacer`` deployment only holds one and a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from r2ray.serving.config import PacingConfig


def paced_lambda(lam: float, spend_rate_usd_s: float, target_usd_s: float,
                 config: PacingConfig) -> float:
    """One multiplicative update of λ from a window's spend rate (USD/s) against the target."""
    ratio = min(spend_rate_usd_s / target_usd_s, config.max_ratio)
    moved = lam * math.exp(config.eta * (ratio - 1.0))
    return min(max(moved, config.lambda_min), config.lambda_max)


@dataclass(frozen=True)
class SolvedFor:
    """The model version and catalogue a batch manifest's λ* was solved for: λ* is quality per
    USD of *that* predictor's q̂ and ĉ at *those* prices, so it misprices any other's."""

    model: str | None     # the manifest's ``model.label``: NAME/VERSION, or the model's folder
    catalog: str | None   # its ``catalog_fingerprint``
    strict_budget: bool = False   # its ``spend.strict_budget``: λ* priced each arm's worst case
                                  # at its cap, not ĉ (routing.solve_costs), so Serve must too
    correction: str | None = None  # the cost correction's version that priced its ĉ; "": none
                                   # (None: not recorded)

    @classmethod
    def of(cls, manifest: dict) -> SolvedFor:
        spend = manifest.get("spend") or {}
        recorded = spend.get("cost_correction")
        correction = None if not isinstance(recorded, dict) else \
            (recorded.get("version") or "") if recorded.get("applied") else ""
        return cls((manifest.get("model") or {}).get("label"), manifest.get("catalog_fingerprint"),
                   bool(spend.get("strict_budget", False)), correction)

    def mismatch(self, version: str, catalog_fingerprint: str) -> str | None:
        """What differs from the served ``version`` (RoutingModel.version, labelled as the batch
        job labels it) and catalogue, in words; None: the same (or not recorded)."""
        differs = []
        if self.model is not None and self.model != version:
            differs.append(f"model {self.model}, not {version}")
        if self.catalog is not None and self.catalog != catalog_fingerprint:
            differs.append(f"catalogue {self.catalog[:12]}, not {catalog_fingerprint[:12]}")
        return "; ".join(differs) or None


@dataclass(frozen=True)
class PriceState:
    """What a router needs to price a query right now (sent to every ingress replica)."""

    lam: float            # quality per USD
    tie_cut: float        # the batch solve's tie rule (applies while λ is exactly λ*)
    seed: int
    stopped: bool         # hard stop: route to the cheapest arm
    source: str           # where λ started: "manifest <uri>", "config" or "default"
    window_spend_usd: float = 0.0
    total_spend_usd: float = 0.0
    updates: int = 0      # λ updates so far (windows that closed with queries)
    floor: bool = False   # λ is paced with request_lambda "floor": a request's λ may only raise it
    solved_for: SolvedFor | None = None   # what the manifest's λ* priced; None: not a manifest's

    def mismatch(self, version: str, catalog_fingerprint: str) -> str | None:
        """What the served model and catalogue differ in from those λ* was solved for, in words
        (None: the same, or λ is not a manifest's): such a λ misprices every decision."""
        return None if self.solved_for is None else \
            self.solved_for.mismatch(version, catalog_fingerprint)

    def request_price(self, requested: float | None) -> tuple[float, str]:
        """(λ, its source) for a request that asked for ``requested`` (None: the paced λ)."""
        if requested is None:
            return self.lam, self.source
        if self.floor and requested < self.lam:
            return self.lam, f"{self.source}, paced (above the request's lambda {requested:.6g})"
        return float(requested), "request lambda"


class Pacer:
    """Holds λ and the spend books; ``record`` spend as it happens, ``tick`` to close windows."""

    def __init__(self, config: PacingConfig, lam: float, *, tie_cut: float = 1.0, seed: int = 0,
                 source: str = "config", now: float = 0.0, solved_for: SolvedFor | None = None):
        self.config = config
        self.lam = min(max(float(lam), config.lambda_min), config.lambda_max) \
            if config.target_usd_per_s is not None else float(lam)
        self.tie_cut, self.seed, self.source = tie_cut, seed, source
        self.solved_for = solved_for
        self.window_start = now
        self.window_spend_usd = 0.0
        self.window_queries = 0   # queries booked in the window: none, and λ stays at its close
        self.total_spend_usd = 0.0
        self.updates = 0
        self.last_seq: dict[str, int] = {}   # per ingress: the newest sync applied

    def report(self, ingress: str, seq: int, spend_usd: float, now: float,
               queries: int = 1) -> bool:
        """Record an ingress's sync ``seq`` of ``spend_usd`` (USD) over ``queries`` booked queries
        once: an ingress resends a sync whose reply it lost, and the Pacer may have applied it
        already. False: a repeat."""
        if seq <= self.last_seq.get(ingress, 0):
            self.tick(now)
            return False
        self.last_seq[ingress] = seq
        self.record(spend_usd, now, queries)
        return True

    def record(self, spend_usd: float, now: float, queries: int = 1) -> None:
        """Add spend (USD) of ``queries`` queries booked at time ``now`` (0 USD for a free arm's:
        still a query); closes any window that ended first."""
        self.tick(now)
        self.window_queries += queries
        self.window_spend_usd += max(float(spend_usd), 0.0)
        self.total_spend_usd += max(float(spend_usd), 0.0)

    def tick(self, now: float) -> PriceState:
        """Close the window if ``window_s`` has passed: one update over the elapsed time, none
        for a window in which no query was booked (idle traffic, not a price too high)."""
        elapsed = now - self.window_start
        target = self.config.target_usd_per_s
        if target is not None and elapsed >= self.config.window_s:
            if self.window_queries:
                self.lam = paced_lambda(self.lam, self.window_spend_usd / elapsed, target,
                                        self.config)
                self.updates += 1
            self.window_start, self.window_spend_usd, self.window_queries = now, 0.0, 0
        return self.state()

    @property
    def stopped(self) -> bool:
        """A hard stop is in force: the window's share is spent, or the total limit is reached."""
        c = self.config
        if c.spend_limit_usd is not None and self.total_spend_usd >= c.spend_limit_usd:
            return True
        if c.target_usd_per_s is None or c.hard_stop_ratio is None:
            return False
        return self.window_spend_usd >= c.hard_stop_ratio * c.target_usd_per_s * c.window_s

    def state(self) -> PriceState:
        c = self.config
        return PriceState(self.lam, self.tie_cut, self.seed, self.stopped, self.source,
                          self.window_spend_usd, self.total_spend_usd, self.updates,
                          c.target_usd_per_s is not None and c.request_lambda == "floor",
                          self.solved_for)


class StartingPrice(NamedTuple):
    lam: float                # quality per USD
    tie_cut: float
    seed: int
    source: str               # "manifest <uri>", "config" or "default"
    solved_for: SolvedFor | None = None   # a manifest's: the model and catalogue λ* priced


def starting_price(manifest: str | None, lam: float | None, tie_cut: float = 1.0,
                   seed: int = 0) -> StartingPrice:
    """λ, tie_cut, seed and source to start from: a committed batch manifest's λ*, θ*-cut and
    seed (``manifest`` is a ``manifest.json`` URI, or a batch output folder whose newest committed
    run is used) with the model and catalogue it was solved for, else ``lam`` from the config,
    else 0 (every query gets its best predicted arm)."""
    from r2ray.errors import R2RayError
    from r2ray.redaction import redact_uri
    from r2ray.manifest import MANIFEST, latest_committed, read_manifest

    if manifest is not None:
        uri = manifest if manifest.rstrip("/").endswith(MANIFEST) else latest_committed(manifest)
        if uri is None:
            raise R2RayError(f"manifest: no committed batch run under {redact_uri(manifest)}; run "
                             "`r2ray route` first, or give lambda instead")
        record = read_manifest(uri)
        solve = record.get("solve")
        if not solve:   # every row of that run was quarantined: it priced nothing
            raise R2RayError(f"manifest: {redact_uri(uri)} has no solve (its run routed no "
                             "query); give its batch output folder, whose newest run with a "
                             "solve is used, or lambda instead")
        return StartingPrice(float(solve["lambda"]), float(solve["tie_cut"]), int(solve["seed"]),
                             f"manifest {redact_uri(uri)}", SolvedFor.of(record))
    if lam is not None:
        return StartingPrice(float(lam), tie_cut, seed, "config")
    return StartingPrice(0.0, tie_cut, seed, "default")
