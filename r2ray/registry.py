"""Predictor versions in the MLflow model registry: register, load by URI, promote by alias.

Tracking store: the ``tracking_uri`` argument, else ``R2RAY_TRACKING_URI``, else
``MLFLOW_TRACKING_URI``, else MLflow's default, a local SQLite file ``sqlite:///mlflow.db`` in the
current folder (artifacts then go to ``./mlruns``). Production uses an ``mlflow server`` with a
database and S3 artifacts (``mlflow/README.md``); point ``R2RAY_TRACKING_URI`` at it.

A version is an :class:`r2ray.predictor.pyfunc.R2RayPyfunc`, logged from code, whose one artifact
is the saved predictor (tensors + JSON, with its catalogue), so ``mlflow.pyfunc.load_model(
"models:/r2ray@champion")`` works in any process with r2ray installed, and
:func:`load_registered` gives the predictor object itself (for Ray workers and Serve). The model
carries this package's wheel and pins every dependency (:mod:`r2ray.wheel`), so MLflow can rebuild
its environment with no index that has r2ray.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from r2ray import __version__
from r2ray.catalog import Catalog
from r2ray.encoders import has_text_encoder
from r2ray.errors import R2RayError
from r2ray.predictor.base import BasePredictor
from r2ray.predictor.persist import (DIGEST_FIELD, encoder_record, load_predictor,
                                     read_predictor_config, save_predictor)
from r2ray.redaction import redact_text, redacted_output
from r2ray.wheel import model_requirements, package_wheel

PRIMARY_METRIC = "audc"  # higher is better; promotion compares this on the same test split


class RegistryError(R2RayError, ValueError):
    """A model URI that does not resolve, or a registry that cannot be reached."""


@contextmanager
def mlflow_guard() -> Iterator[None]:
    """Around calls into MLflow, which quotes the tracking URI as given (password included) in
    its errors and printed run links: redact its output, and re-raise its errors as RegistryError
    with credentials stripped. It does not import MLflow itself (seconds): an MLflow error can
    only come from code that did."""
    with redacted_output():
        try:
            yield
        except Exception as err:
            errors = sys.modules.get("mlflow.exceptions")
            if errors is not None and isinstance(err, errors.MlflowException):
                raise RegistryError(redact_text(str(err))) from None
            raise


def configure_tracking(explicit: str | None = None) -> str:
    """Point MLflow's tracking and registry at ``explicit`` or ``R2RAY_TRACKING_URI`` when given;
    otherwise leave MLflow's own choice (``MLFLOW_TRACKING_URI``, a URI the caller set, or its
    default ``sqlite:///mlflow.db`` in the current folder). Returns the URI in use."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = explicit or os.environ.get("R2RAY_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return mlflow.get_tracking_uri()


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    source: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class RegisteredPredictor(NamedTuple):
    predictor: BasePredictor
    catalog: Catalog
    encoder_spec: str | None
    version: VersionInfo | None  # None when loaded from a plain folder


def _version_info(model_version) -> VersionInfo:
    return VersionInfo(name=model_version.name, version=str(model_version.version),
                       run_id=model_version.run_id, source=model_version.source,
                       aliases=list(model_version.aliases or []), tags=dict(model_version.tags or {}))


# ---- register ---------------------------------------------------------------------------------
def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "query", required=False),
                     ColSpec("long", "input_tokens", required=False),
                     ColSpec(Array("double"), "embedding", required=False)])
    outputs = Schema([ColSpec("double", "input_tokens"), ColSpec(Array("double"), "quality"),
                      ColSpec(Array("double"), "output_tokens"),
                      ColSpec(Array("double"), "cost_usd")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _input_example(predictor: BasePredictor, encoder_spec: str | None):
    import pandas as pd

    queries = ["What is the derivative of x^3?", "Write a haiku about autumn."]
    if has_text_encoder(encoder_spec):
        return pd.DataFrame({"query": queries, "input_tokens": [12, 9]})
    zeros = [np.zeros(predictor.embedding_dim_, dtype=np.float32).tolist()] * 2
    return pd.DataFrame({"query": queries, "input_tokens": [12, 9], "embedding": zeros})


REGISTER_EXPERIMENT = "r2ray-register"   # where a registration outside any run logs its model


@mlflow_guard()
def register_predictor(predictor: BasePredictor, name: str, *, encoder_spec: str | None = None,
                       tags: dict[str, str] | None = None,
                       tracking_uri: str | None = None) -> VersionInfo:
    """Log ``predictor`` as a pyfunc model in the active MLflow run (one is started if none is)
    and register it as a new version of ``name``. The version's tags name its kind, encoder,
    catalogue and the predictor's ``document_sha256`` (its fingerprint: which predictor the
    version holds, as run manifests and cost corrections record it)."""
    import mlflow

    from r2ray.predictor.pyfunc import MODEL_CODE_PATH, PREDICTOR_ARTIFACT, arm_labels

    configure_tracking(tracking_uri)
    encoder_spec, encoder_fingerprint = encoder_record(predictor, encoder_spec)
    with tempfile.TemporaryDirectory(prefix="r2ray-register-") as tmp:
        folder = save_predictor(predictor, str(Path(tmp) / PREDICTOR_ARTIFACT), encoder_spec)
        fingerprint = read_predictor_config(folder)[DIGEST_FIELD]
        wheel = package_wheel(tmp)
        active = mlflow.active_run()
        if active is None:  # an experiment of *this* store: MLflow remembers the last one set,
            mlflow.set_experiment(REGISTER_EXPERIMENT)  # maybe on another store (id unknown here)
            mlflow.start_run(run_name=f"register-{name}")
        try:
            info = mlflow.pyfunc.log_model(
                name="predictor", python_model=MODEL_CODE_PATH,
                artifacts={PREDICTOR_ARTIFACT: folder}, code_paths=[str(wheel)],
                model_config={"device": None},  # None: the saved device; load_model may override
                signature=_signature(),
                input_example=_input_example(predictor, encoder_spec),
                pip_requirements=model_requirements(wheel), registered_model_name=name,
                metadata={"r2ray_version": __version__, "kind": predictor.name,
                          "encoder": encoder_spec, "encoder_fingerprint": encoder_fingerprint,
                          "embedding_dim": predictor.embedding_dim_,
                          "catalog_fingerprint": predictor.catalog_.fingerprint,
                          "data_fingerprint": predictor.data_fingerprint_,
                          "arms": arm_labels(predictor.catalog_)})
        finally:
            if active is None:
                mlflow.end_run()
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in {"kind": predictor.name, "encoder": str(encoder_spec),
                       "encoder_fingerprint": str(encoder_fingerprint),
                       "catalog_fingerprint": predictor.catalog_.fingerprint,
                       **(tags or {}), DIGEST_FIELD: fingerprint}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return _version_info(client.get_model_version(name, version))


# ---- resolve and load ---------------------------------------------------------------------------
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


def _quoted(name: str) -> str:
    """``name`` as a string in an MLflow search filter: in double quotes when it holds a single
    one (``alice's-router``: in single quotes the filter was refused as invalid, so /latest of a
    name that exists did not resolve); MLflow's filters have no escapes."""
    return f'"{name}"' if "'" in name else f"'{name}'"


@mlflow_guard()
def resolve_version(uri: str, tracking_uri: str | None = None) -> VersionInfo:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (or ``/latest``) → its version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    match = _MODELS_URI.match(uri)
    if not match:
        raise RegistryError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    configure_tracking(tracking_uri)
    client = mlflow.MlflowClient()
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name={_quoted(name)}")
            if not versions:
                client.get_registered_model(name)   # a name that does not exist: MLflow says so
                raise ValueError(f"registered model {name!r} has no versions")
            found = max(versions, key=lambda v: int(v.version))
        else:
            found = client.get_model_version(name, version)
    except (MlflowException, ValueError) as err:
        raise RegistryError(redact_text(f"{uri} does not resolve in "
                                        f"{configure_tracking(tracking_uri)}: "
                                        f"{str(err).splitlines()[0]}")) from None
    return _version_info(found)


@mlflow_guard()
def load_registered(uri: str, tracking_uri: str | None = None,
                    device: str | None = None) -> RegisteredPredictor:
    """Load a predictor from ``models:/…`` (registry) or a folder written by save_predictor
    (that one without importing MLflow: seconds off every job's start)."""
    if not uri.startswith("models:/"):
        predictor = load_predictor(uri, device=device)
        return RegisteredPredictor(predictor, predictor.catalog_, predictor.encoder_spec, None)
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    version = resolve_version(uri, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="r2ray-load-") as tmp:  # weights are read into memory
        try:
            model = mlflow.pyfunc.load_model(version.uri, dst_path=tmp,
                                             model_config={"device": device} if device else None)
        # its files are gone or damaged in the store: the predictor's (R2RayError, OSError), or
        # MLflow's own (MlflowException; an MLmodel that is not YAML, or not a mapping, reaches
        # here as MLflow's parse error: YAMLError, AttributeError, TypeError)
        except (R2RayError, OSError, MlflowException, yaml.YAMLError, AttributeError,
                TypeError) as err:
            raise RegistryError(redact_text(f"{uri} ({version.uri}, source {version.source}) "
                                            f"cannot be loaded: {type(err).__name__}: {err}")
                                ) from None
        predictor = model.unwrap_python_model().predictor
    return RegisteredPredictor(predictor, predictor.catalog_, predictor.encoder_spec, version)


# ---- promote -------------------------------------------------------------------------------------
@mlflow_guard()
def alias_holder(name: str, alias: str, tracking_uri: str | None = None) -> VersionInfo | None:
    """The version ``name@alias`` points at, or None when the registry says the model does not
    exist or holds no such alias. Any other failure (a registry down or erring) is a
    RegistryError: read as "no holder", it promoted a candidate without comparing it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_tracking(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(alias)
    return None if version is None else _version_info(client.get_model_version(name, version))


@dataclass
class Promotion:
    alias: str
    candidate: VersionInfo
    holder: VersionInfo | None
    candidate_score: dict | None
    holder_score: dict | None
    promoted: bool
    reason: str

    def report(self) -> str:
        def line(label: str, info: VersionInfo | None, score: dict | None) -> str:
            metrics = ("not scored" if score is None else ", ".join(
                f"{k} {_metric_text(score[k])}" for k in ("audc", "qnc", "peak") if k in score))
            return f"  {label:<10} {info.uri if info else '(none)':<28} {metrics}"

        verdict = "promoted" if self.promoted else "not promoted"
        return "\n".join([f"alias @{self.alias}: {verdict} ({self.reason})",
                          line("candidate", self.candidate, self.candidate_score),
                          line("holder", self.holder, self.holder_score)])


def _metric_text(value) -> str:
    """A score's metric as the report shows it: 4 decimals, or as it is where it is no number
    (None: a refusal says why, and the report must still print)."""
    return f"{value:.4f}" if isinstance(value, (int, float, np.number)) else str(value)


def _not_finite(label: str, score: dict) -> str | None:
    """Why ``score`` cannot be compared (its ``audc`` missing, NaN or infinite), else None: NaN
    compares false both ways, so it would promote with no holder and never lose the alias."""
    value = score.get(PRIMARY_METRIC)
    if value is None or not np.isfinite(value):
        return (f"the {label}'s {PRIMARY_METRIC} is {value}, not a finite number: "
                "compare them with `r2ray evaluate`")
    return None


def _embeds_text(version: VersionInfo) -> bool:
    """Whether the version's predictor can embed text: its ``encoder`` tag names a text encoder
    (the tag is ``"None"`` for precomputed embeddings; a version without the tag counts as
    one that cannot)."""
    spec = version.tags.get("encoder")
    return has_text_encoder(None if spec == "None" else spec)


def _drops_text(candidate: VersionInfo, holder: VersionInfo | None) -> str | None:
    """Why ``candidate`` may not take the alias from ``holder``: the holder embeds text and the
    candidate cannot (fitted on precomputed embeddings with no encoder named), so with the alias
    Serve would refuse every request without an ``embedding`` and the batch job quarantine
    every such query, however well it scores; else None."""
    if holder is None or not _embeds_text(holder) or _embeds_text(candidate):
        return None
    return (f"the holder {holder.uri} embeds text with {holder.tags['encoder']!r} and the "
            "candidate cannot (fitted on precomputed embeddings): Serve and the batch job would "
            "refuse every query sent without an embedding; train it with --encoder")


def _compare(candidate_score: dict, holder_score: dict) -> tuple[bool, str]:
    """(promoted, reason): the candidate wins on a strictly higher ``audc``."""
    promoted = candidate_score[PRIMARY_METRIC] > holder_score[PRIMARY_METRIC]
    return promoted, (f"{PRIMARY_METRIC} {candidate_score[PRIMARY_METRIC]:.4f} "
                      f"{'>' if promoted else '<='} {holder_score[PRIMARY_METRIC]:.4f}")


@mlflow_guard()
def promote_if_better(candidate: VersionInfo, alias: str,
                      score: Callable[[RegisteredPredictor], dict],
                      tracking_uri: str | None = None,
                      candidate_score: dict | None = None) -> Promotion:
    """Move ``alias`` to ``candidate`` when it beats the current holder on ``score`` (a dict
    with ``audc``; higher wins, a tie keeps the holder). With no holder the candidate is promoted.
    Both are scored by the same function, so on the same evaluation data; ``candidate_score``
    skips re-scoring a candidate the caller has just scored with ``score``. A score that is not
    a finite number promotes nothing, and neither does an alias that moved while scoring (another
    promotion won meanwhile: this one compared against a version that no longer holds it)."""
    holder = alias_holder(candidate.name, alias, tracking_uri)
    dropped = _drops_text(candidate, holder)
    if dropped:
        return Promotion(alias, candidate, holder, candidate_score, None, False, dropped)
    if candidate_score is None:
        candidate_score = score(load_registered(candidate.uri, tracking_uri))
    refused = _not_finite("candidate", candidate_score)
    if refused or (holder is not None and holder.version == candidate.version):
        return Promotion(alias, candidate, holder, candidate_score, None, False,
                         refused or "the candidate already holds the alias")
    if holder is None:
        return _move_alias(Promotion(alias, candidate, None, candidate_score, None, True,
                                     "no current holder"), tracking_uri)
    try:
        holder_score = score(load_registered(holder.uri, tracking_uri))
    except (R2RayError, ValueError) as err:
        return Promotion(alias, candidate, holder, candidate_score, None, False,
                         f"the holder cannot be scored on this evaluation: {err}")
    refused = _not_finite("holder", holder_score)
    promoted, reason = (False, refused) if refused else _compare(candidate_score, holder_score)
    return _move_alias(Promotion(alias, candidate, holder, candidate_score, holder_score,
                                 promoted, reason), tracking_uri)


def _move_alias(promotion: Promotion, tracking_uri: str | None) -> Promotion:
    """Point the alias at the candidate when ``promotion`` says so and the alias still names the
    holder it was scored against; else the promotion, refused, naming the version now there."""
    import mlflow

    if not promotion.promoted:
        return promotion
    name, alias, holder = promotion.candidate.name, promotion.alias, promotion.holder
    now = alias_holder(name, alias, tracking_uri)
    if (now and now.version) != (holder and holder.version):
        return replace(promotion, promoted=False, reason=(
            f"@{alias} moved to {now.uri if now else '(none)'} while this promotion scored "
            f"against {holder.uri if holder else '(none)'}; run it again to compare with it"))
    mlflow.MlflowClient().set_registered_model_alias(name, alias, promotion.candidate.version)
    return promotion
