"""The nightly batch job: a backlog in object storage routed under one global spend limit.

Stages, each a function over Arrow tables that a test can call without Ray: :mod:`.backlog`
(read, validate, quarantine), :mod:`.score` (predictor → hull chains), :mod:`.dedupe` (repeated
ids), the solve (:mod:`r2ray.solver`), :mod:`.assign` (chosen arm → routed prompt, written per
model), :mod:`.report`; :mod:`.job` composes them on Ray Data and commits the run
(:mod:`r2ray.manifest`). :mod:`.config` holds every setting and its default.
"""

from r2ray.batch.config import RouteConfig, route_config
from r2ray.batch.job import route_batch, summarise_manifest

__all__ = ["RouteConfig", "route_batch", "route_config", "summarise_manifest"]
