"""Typed configuration for the batch job, every default visible in one place.

Unknown keys are rejected; the resolved config is saved in every run's manifest. S3 endpoints and
credentials are deliberately *not* here: they come from the environment (see :mod:`r2ray.storage`).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from r2ray.encoders import Precision
from r2ray.errors import ConfigError

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# a float the pool and the plan can use: NaN fails no bound with a clear message, and an
# infinite CPU share overflows the thread count derived from it
Finite = Annotated[float, Field(allow_inf_nan=False)]


class RouteConfig(BaseModel):
    """One batch routing run: backlog in, routed prompts out, under one spend limit (USD)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Annotated[str, Field(min_length=1)]           # file, prefix or glob; local or s3://
    output: Annotated[str, Field(min_length=1)]          # runs land under <output>/<run_id>/
    model: Annotated[str, Field(min_length=1)]           # models:/NAME@ALIAS, models:/NAME/V or a dir
    budget_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    budget_per_query_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    spend_guarantee: Annotated[Finite, Field(ge=0, lt=1)] = 0.95  # P(realised ≤ budget) to plan
                                                         # for; 0 = on predicted costs alone
                                                         # (= spend_guarantee.DEFAULT_GUARANTEE)
    strict_budget: bool = False                          # price arms at max_tokens: bill ≤ budget
    cost_correction: bool = True                         # apply the latest reconciliation's
                                                         # per-arm cost factors for this model
    catalog: str | None = None                           # default: the catalogue the model carries
    run_id: str | None = None                            # RUN_ID_PATTERN; default: a timestamp
    force: bool = False                                  # redo a committed run id
    defer: bool = False                                  # budget too small: defer, don't fail
    seed: int = 0                                        # tie-break hash seed
    tracking_uri: str | None = None                      # MLflow; default from the environment
    # the scoring pool (r2ray.batch.pool): None = derived from ray.cluster_resources()
    workers: Annotated[int, Field(ge=1)] | None = None   # predictor actors; default one per CPU
                                                         # (one per GPU share with gpus_per_worker)
    cpus_per_worker: Annotated[Finite, Field(gt=0)] | None = None  # default (CPUs − 1 per
                                                         # node) ÷ workers: room for the feeding
                                                         # tasks
    gpus_per_worker: Annotated[Finite, Field(ge=0)] = 0.0
    threads_per_worker: Annotated[int, Field(ge=1)] | None = None  # torch threads; default
                                                         # cpus_per_worker rounded down, ≥ 1
    batch_size: Annotated[int, Field(ge=1)] | None = None  # rows per actor call; default
                                                         # texts sized from the backlog (256–
                                                         # 2,048), 8,192 embeddings (pool)
    read_tasks: Annotated[int, Field(ge=1)] | None = None  # read tasks at once; default one
                                                         # per 8 workers (r2ray.batch.pool)
    encoder_precision: Precision = "auto"                # the text encoder's forward pass
                                                         # (encoders.load_encoder): bfloat16
                                                         # where native, as Serve's
    task_cpus: Annotated[Finite, Field(gt=0)] = 0.25     # each small task (read, dedupe, solve,
                                                         # assign): fractional, beside the actors

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(RUN_ID_PATTERN, value):
            raise ValueError(f"run id {value!r} is not usable: give 1–128 characters of letters, "
                             "digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> RouteConfig:
        if (self.budget_usd is None) == (self.budget_per_query_usd is None):
            raise ValueError("give exactly one of budget_usd (--budget-usd) and "
                             "budget_per_query_usd (--budget-per-query)")
        return self

    def resolved_run_id(self) -> str:
        return self.run_id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%dT%H%M%SZ")


def route_config(**values) -> RouteConfig:
    """Build a RouteConfig, turning validation errors into one readable ConfigError."""
    try:
        return RouteConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        raise ConfigError.from_validation("routing config", err) from None
