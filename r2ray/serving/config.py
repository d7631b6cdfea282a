"""Typed configuration of the online router, every default visible in one place.

Built from the Serve application's arguments (``serve run serve.app:app key=value ...`` or the
``args:`` of ``serve/config.yaml``). Unknown keys are rejected. Secrets are never values here:
API keys come from the environment variables *named* by ``api_key_envs`` / ``upstream_key_envs``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from r2ray.encoders import Precision
from r2ray.errors import ConfigError
from r2ray.manifest import MANIFEST

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PacingConfig(BaseModel):
    """Spend pacing: ``λ ← λ·exp(η(spend_rate/target_rate − 1))`` once per window, clamped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_usd_per_s: PositiveFloat | None = None   # None: λ stays where it starts
    window_s: PositiveFloat = 10.0                   # seconds of spend per update
    eta: PositiveFloat = 0.5                         # step size of the log-λ update
    lambda_min: PositiveFloat = 1e-3                 # quality per USD; > 0 so λ can grow again
    lambda_max: PositiveFloat = 1e9
    max_ratio: PositiveFloat = 4.0                   # spend_rate/target clipped to this per update
    hard_stop_ratio: PositiveFloat | None = 3.0      # window spend ≥ ratio × target → cheapest arm
    spend_limit_usd: PositiveFloat | None = None     # total since start; reached → cheapest arm
    # a request's own lambda while λ is paced (a target is set): "floor" routes it at
    # max(its λ, the paced λ), so a caller can be more frugal but cannot spend past the target
    # (20 % of traffic at lambda 0 replacing the paced λ spent 2.1× the target in a simulation);
    # "override" lets it replace the paced λ, the hard stops its only bound
    request_lambda: Literal["floor", "override"] = "floor"

    @model_validator(mode="after")
    def _clamps(self) -> PacingConfig:
        if self.lambda_min > self.lambda_max:
            raise ValueError(f"lambda_min {self.lambda_min} is above lambda_max {self.lambda_max}")
        return self


class ServeConfig(BaseModel):
    """The online router: which model, which price, how to pace, who may call, how to batch."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model: Annotated[str, Field(min_length=1)] = "models:/r2ray@champion"  # or a saved folder
    tracking_uri: str | None = None            # MLflow; default R2RAY_TRACKING_URI / MLflow's own
    catalog: str | None = None                 # prices/endpoints override; same arms as the model
    manifest: str | None = None                # a manifest.json, or a batch output folder (latest)
    cost_correction: bool = True               # ĉ × the reconcile factors the served run used
                                               # (router.served_correction), found beside the
                                               # manifest (its batch output folder)
    lam: float | None = Field(default=None, ge=0, allow_inf_nan=False,  # quality per USD
                              validation_alias=AliasChoices("lambda", "lam"))
    tie_cut: Annotated[float, Field(ge=0, le=1)] = 1.0  # overridden by the manifest's
    seed: int = 0                                        # overridden by the manifest's
    pacing: PacingConfig = PacingConfig()
    api_key_envs: list[Annotated[str, Field(pattern=ENV_NAME)]] = []  # empty: no auth
    upstream_key_envs: dict[str, Annotated[str, Field(pattern=ENV_NAME)]] = {}  # model or "*"
    upstream_timeout_s: PositiveFloat = 60.0
    max_request_bytes: Annotated[int, Field(gt=0)] = 1_000_000
    batch_max_size: Annotated[int, Field(ge=1, le=1024)] = 32    # queries per encoder+predictor call
    batch_wait_s: Annotated[float, Field(ge=0, le=1)] = 0.0       # wait for a batch to fill
    watch_interval_s: PositiveFloat = 10.0     # how often the router re-resolves the alias
    price_sync_s: PositiveFloat = 0.25         # how often the ingress reports spend and reads λ
    alternatives: Annotated[int, Field(ge=0, le=20)] = 3
    router_replicas: Annotated[int, Field(ge=1)] = 1   # replicas of the ingress, which routes
    router_cpus: PositiveFloat = 0.25          # per replica; fractional: small machines hang on
                                               # whole CPUs
    router_gpus: Annotated[float, Field(ge=0)] = 0.0  # > 0: encoder and predictor on the GPU
    pacer_cpus: PositiveFloat = 0.05
    gc_freeze: bool = True                     # move the loaded heap out of the collector's reach
                                               # (off only to measure what it changes)
    device: str | None = None                  # encoder/predictor device; default cuda if visible
    encoder_precision: Precision = "auto"      # the text encoder's forward pass
                                               # (encoders.load_encoder); as the batch job's
                                               # default, so both route alike

    @field_validator("api_key_envs", mode="before")
    @classmethod
    def _names(cls, value):
        """``serve run ... api_key_envs=A,B`` passes one string."""
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("pacing", "upstream_key_envs", mode="before")
    @classmethod
    def _json(cls, value):
        """``serve run ... pacing='{"target_usd_per_s": 0.01}'`` passes JSON text."""
        return json.loads(value) if isinstance(value, str) else value

    def corrections_root(self) -> str | None:
        """The batch output folder whose reconciliations price ĉ: ``manifest`` itself, or the
        folder above the run of a ``manifest.json`` (None: no manifest, or turned off)."""
        if self.manifest is None or not self.cost_correction:
            return None
        uri = self.manifest.rstrip("/")
        if not uri.endswith(f"/{MANIFEST}"):
            return uri
        return uri.rsplit("/", 2)[0]   # <root>/<run_id>/manifest.json → <root>


def serve_config(args: dict | None) -> ServeConfig:
    """Build a ServeConfig from application args, with one readable error listing every problem."""
    try:
        return ServeConfig.model_validate(dict(args or {}))
    except (ValidationError, json.JSONDecodeError) as err:
        if isinstance(err, json.JSONDecodeError):
            raise ConfigError(f"invalid serve config: a JSON-valued argument is not JSON: {err}") \
                from None
        raise ConfigError.from_validation("serve config", err) from None
