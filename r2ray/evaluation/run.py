"""``r2ray evaluate``: resolve the model and the bench, run every method, write the report.

The model URI may be ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (MLflow registry), a
local folder written by ``save_predictor``, or a bare predictor name (``r2ray``, ``per_arm_mlp``,
...) meaning that predictor at its default settings with no fitted weights. See
:mod:`r2ray.evaluation.harness` for what the model contributes to the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from r2ray import storage
from r2ray.bench.io import read_bench, read_table
from r2ray.catalog import Catalog
from r2ray.errors import R2RayError
from r2ray.evaluation import harness, summary
from r2ray.evaluation.harness import log_line
from r2ray.evaluation.metrics import lambda_grid
from r2ray.predictor.base import Predictor
from r2ray.predictor.data import BenchArrays, bench_arrays
from r2ray.redaction import redact_uri, redact_values

DEFAULT_ENCODER = "minilm"


@dataclass(frozen=True)
class ModelUnderTest:
    """What ``--model`` names: a predictor kind and settings, maybe fitted weights and their data."""

    uri: str
    name: str                        # registry key in r2ray.predictor.PREDICTORS
    settings: dict                   # constructor settings to re-fit with
    fitted: Predictor | None = None  # the registered / saved weights, if any
    catalog: Catalog | None = None   # the catalogue it was trained with
    encoder: str | None = None       # encoder spec of its training embeddings
    encoder_fingerprint: str | None = None   # that encoder's files (encoders.encoder_fingerprint)
    version: dict = field(default_factory=dict)

    def fresh(self, seed: int) -> Predictor:
        """An unfitted copy with the same settings and ``seed`` (when the predictor has one)."""
        return fresh_predictor(self.name, self.settings, seed)


def fresh_predictor(name: str, settings: dict, seed: int) -> Predictor:
    from r2ray.predictor import make_predictor

    predictor = make_predictor(name, **settings)
    if "seed" in predictor.settings():
        predictor = make_predictor(name, **{**settings, "seed": seed})
    return predictor


def resolve_model(uri: str, tracking_uri: str | None = None) -> ModelUnderTest:
    """Load what ``--model`` names (see the module docstring)."""
    from r2ray.predictor import PREDICTORS
    from r2ray.predictor.persist import CONFIG_FILE

    if uri.startswith("models:/") or storage.exists(storage.join(uri, CONFIG_FILE)):
        from r2ray.registry import load_registered

        loaded = load_registered(uri, tracking_uri)
        version = redact_values(asdict(loaded.version)) if loaded.version is not None else {}
        return ModelUnderTest(redact_uri(uri), loaded.predictor.name, loaded.predictor.settings(),
                              loaded.predictor, loaded.catalog, loaded.encoder_spec,
                              loaded.predictor.encoder_fingerprint, version)
    if uri in PREDICTORS:
        return ModelUnderTest(uri, uri, {})
    raise R2RayError(f"--model {redact_uri(uri)!r} is neither a registry URI (models:/NAME@ALIAS), "
                     f"a saved predictor folder (no {CONFIG_FILE} there), nor a predictor name "
                     f"({', '.join(PREDICTORS)})")


def load_bench_arrays(bench_uri: str, catalog: Catalog, queries_uri: str | None,
                      encoder: str | None, log: Callable[[str], None] = log_line,
                      model: ModelUnderTest | None = None) -> tuple[BenchArrays, str]:
    """The bench as arrays with query embeddings, and a line saying where the embeddings came from.
    ``model``: the model whose ``encoder`` this is. Fitted, its encoder is checked to be the one
    it was trained with (:func:`r2ray.encoders.check_encoder`) before any text is embedded for
    it, and one that names none (precomputed embeddings) needs ``queries_uri``, as Serve and the
    batch job need an ``embedding``: MiniLM's vectors were scored in their place."""
    table = read_bench(bench_uri, catalog)
    if queries_uri:
        return bench_arrays(table, catalog, read_table(queries_uri), bench_uri), \
            f"precomputed, from {queries_uri}"
    from r2ray.embedding_cache import embed_texts
    from r2ray.encoders import check_encoder, has_text_encoder, load_encoder

    fitted = model is not None and model.fitted is not None
    if (encoder or fitted) and not has_text_encoder(encoder):
        raise R2RayError(f"the model was trained on {encoder or 'precomputed'!r} embeddings, which "
                         "no encoder makes from text: pass --queries with those embeddings")
    if fitted:
        check_encoder(encoder, model.encoder_fingerprint, model.uri)
    arrays = bench_arrays(table, catalog, source=bench_uri)
    spec = encoder or DEFAULT_ENCODER
    log(f"encoding {arrays.n_queries} queries with {spec} ...")
    return arrays.with_embedding(embed_texts(load_encoder(spec), list(arrays.query))), \
        f"encoder {spec}"


def choose_catalog(model: ModelUnderTest, catalog_path: str | None,
                   bench_uri: str) -> tuple[Catalog, str]:
    """(catalogue, where from): ``--catalog``, else the model's training catalogue, else the
    ``<bench>.catalog.yaml`` beside the bench, else the default pool."""
    from r2ray.bench.stats import catalog_for_bench

    if model.catalog is not None and not catalog_path:
        return model.catalog, "the model's training catalogue"
    return catalog_for_bench(bench_uri, catalog_path)


def run_evaluation(arrays: BenchArrays, catalog: Catalog, model: ModelUnderTest, seeds: list[int],
                   split: str, out_dir: str, context: dict | None = None,
                   methods: list[str] | None = None, lambdas: np.ndarray | None = None,
                   method_settings: dict[str, dict] | None = None,
                   train_sizes: list[int] | None = None,
                   log: Callable[[str], None] = log_line) -> dict:
    """Run every method on every split, write ``metrics.json`` and ``curves.png``; return the metrics.

    ``train_sizes``: also fit every learned method on subsets of each split's training part of
    these sizes (:mod:`r2ray.evaluation.learning_curves`): ``learning_curves`` in metrics.json and
    ``learning_curves.png``.

    ``methods`` restricts the learned methods (default: every key of ``PREDICTORS`` but the
    ``COMPOSITE`` ones); the model
    under test replaces the entry of its own name. ``method_settings`` gives the other learned
    methods non-default settings (recorded in metrics.json).
    """
    lambdas = lambda_grid() if lambdas is None else lambdas
    method_settings = method_settings or {}
    names = learned_methods(methods)
    factories = {n: (model.fresh if n == model.name else
                     _factory(n, method_settings.get(n, {}))) for n in names}
    factories.setdefault(model.name, model.fresh)
    splits = harness.make_splits(arrays, split, seeds)
    registered = _registered_block(model, arrays, catalog, lambdas)  # cheap; fails early
    outcomes = []
    for s in splits:
        log(f"{s.label}: {len(s.train)} train / {len(s.test)} test queries")
        outcomes.append(harness.evaluate_split(arrays, catalog, s, factories, lambdas, log))
    context = {**(context or {}), "baseline_settings": {
        n: method_settings.get(n, "defaults") for n in factories if n != model.name}}
    if train_sizes:
        from r2ray.evaluation.learning_curves import learning_curves

        context["learning_curves"] = learning_curves(arrays, catalog, splits, train_sizes,
                                                     factories, lambdas, log)
    metrics = summary.metrics_document(outcomes, model=model, split=split, seeds=seeds,
                                      lambdas=lambdas, registered=registered, context=context)
    summary.write_outputs(metrics, outcomes, out_dir, subject=model.name)
    log(summary.format_table(metrics))
    return metrics


def learned_methods(methods: list[str] | None) -> list[str]:
    """The learned methods ``--methods`` names, checked; None: every key of ``PREDICTORS`` but the
    ``COMPOSITE`` ones. An empty list (``--methods ,``) is refused: it would run no learned
    baseline and the report would not say why."""
    from r2ray.predictor import COMPOSITE, PREDICTORS

    if methods is None:
        return [n for n in PREDICTORS if n not in COMPOSITE]
    if not methods:
        raise R2RayError(f"--methods names no method; give one or more of {', '.join(PREDICTORS)}"
                         " (comma-separated), or leave it out for the default set")
    unknown = sorted(set(methods) - set(PREDICTORS))
    if unknown:
        raise R2RayError(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(PREDICTORS)}")
    return list(methods)


def _factory(name: str, settings: dict) -> harness.PredictorFactory:
    return lambda seed: fresh_predictor(name, settings, seed)


def _registered_block(model: ModelUnderTest, arrays: BenchArrays, catalog: Catalog,
                      lambdas: np.ndarray) -> dict:
    if model.fitted is None:
        return {"skipped": "the model URI names settings only, no fitted weights"}
    if model.catalog is not None and model.catalog.fingerprint != catalog.fingerprint:
        return {"skipped": "--catalog differs from the catalogue the weights were trained with"}
    return harness.evaluate_fitted(model.fitted, arrays, catalog, "registered", lambdas)


def evaluate_uris(bench_uri: str, model_uri: str, out_dir: str, catalog_path: str | None = None,
                  seeds: int | None = None, split: str = "random", queries_uri: str | None = None,
                  methods: list[str] | None = None, tracking_uri: str | None = None,
                  train_sizes: list[int] | None = None,
                  log: Callable[[str], None] = log_line) -> dict:
    """The whole command: resolve inputs, evaluate, write ``out_dir``/metrics.json and curves.png.
    ``seeds``: random splits (default 5); ``split="category"`` has one split per category and
    refuses more than one seed rather than ignore it."""
    if split == "category" and seeds not in (None, 1):
        raise R2RayError(f"--seeds {seeds} asks for random splits; --split category makes one "
                         "split per category (leave --seeds out)")
    seeds = 5 if seeds is None else seeds
    if seeds < 1:
        raise R2RayError(f"--seeds must be at least 1, got {seeds}")
    learned_methods(methods)   # before the bench is read and embedded
    model = resolve_model(model_uri, tracking_uri)
    catalog, catalog_source = choose_catalog(model, catalog_path, bench_uri)
    arrays, embeddings = load_bench_arrays(bench_uri, catalog, queries_uri, model.encoder, log,
                                           model)
    context = redact_values({"bench": {"uri": bench_uri, "n_queries": arrays.n_queries,
                                       "n_arms": catalog.n_arms, "catalog": catalog_source,
                                       "catalog_fingerprint": catalog.fingerprint},
                             "embeddings": embeddings})  # metrics.json: no credentials
    fs, out_path = storage.filesystem(out_dir)  # fail on a bad URI before hours of fitting
    if fs.isfile(out_path):   # else a FileExistsError traceback once every split was fitted
        raise R2RayError(f"--out {out_dir} is a file, not a folder: give a folder for "
                         "metrics.json and the plots")
    return run_evaluation(arrays, catalog, model, list(range(seeds)), split, out_dir, context,
                          methods, train_sizes=train_sizes, log=log)
