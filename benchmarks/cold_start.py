"""Cold start of a new model on the synthetic world (prints a table; not a test).

One model (``--new-model``) is held out of the catalogue. Per seed:

1. the old pool: ``--predictor`` (r2ray, the joint network) and per-arm Ridge are fitted on
   ``--train-queries`` queries of world seed 100 + s with the old models' arms only;
2. for n in ``--sizes``, n labelled queries of the new model alone (world seed 200 + s, every arm
   of the new model, none of the old ones) are given to
   - *warm start*: the old network extended (:func:`r2ray.predictor.extend.extend_predictor`:
     the new model's embedding and arm biases fitted, the rest frozen),
   - *full retraining*: the same predictor fitted from scratch on the old rows plus the n new
     rows (each row with the arms it has),
   - *per-arm ridge extended*: the old Ridge plus the new arms' own Ridge fits on the n rows;
3. every predictor is scored on ``--test-queries`` queries of world seed 300 + s with every arm
   of the extended pool (:func:`r2ray.evaluation.method_scores.score_predictor`: AUDC with costs
   normalised over the non-learned methods of the extended pool, so all rows share one scale).
   References: the *old pool* of each family (the old predictor, which never routes to the new
   model: NaN on its arms) and *all rows* (the predictor fitted with the new model's outcomes on every training
   query: what a full bench of the new model would give).

Printed: mean ± sd over seeds of test AUDC per method and n, and the wall time of each fit.
World embeddings (384 dimensions), no text encoder. With ``--bench`` (a long bench, its
catalogue beside it, e.g. ``r2ray bench convert --format paretobandit``) the three parts are
disjoint query sets of that bench drawn per seed, embedded with MiniLM (through the cache).

Usage: python benchmarks/cold_start.py [--new-model Llama-3.1-70B-Instruct] [--seeds 3]
       [--train-queries 2000] [--test-queries 1000] [--sizes 25 50 100 200] [--prior 1.0]
       [--bench BENCH --new-model NAME]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def world_arrays(catalog, n_queries: int, seed: int):
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.predictor.data import bench_arrays

    return bench_arrays(synth_bench(catalog, n_queries, seed), catalog,
                        synth_backlog(catalog, n_queries, seed, embeddings=True))


def blank_arms(arrays, keep):
    """``arrays`` with every cell outside the arms ``keep`` [K] bool set to NaN."""
    from dataclasses import replace

    blank = lambda v: np.where(keep[None], v, np.nan).astype(v.dtype)  # noqa: E731
    return replace(arrays, quality=blank(arrays.quality),
                   output_tokens=blank(arrays.output_tokens), cost_usd=blank(arrays.cost_usd))


def concat(a, b):
    from dataclasses import fields, replace

    return replace(a, **{f.name: np.concatenate([getattr(a, f.name), getattr(b, f.name)])
                         for f in fields(a) if getattr(a, f.name) is not None})


class OldPool:
    """An old-catalogue predictor seen over the extended catalogue: NaN on the new arms."""

    def __init__(self, predictor, extension):
        self.predictor, self.extension = predictor, extension

    def predict(self, embedding):
        from r2ray.predictor.base import ArmPredictions

        p = self.predictor.predict(embedding)
        nan = np.full((len(embedding), len(self.extension.new_arms)), np.nan, np.float32)
        return ArmPredictions(self.extension.place(p.quality, nan),
                              self.extension.place(p.output_tokens, nan))


def world_parts(full, args, seed: int):
    """(training rows, new-model candidates, test rows) of three worlds, every arm."""
    return (world_arrays(full, args.train_queries, 100 + seed),
            world_arrays(full, max(args.sizes), 200 + seed),
            world_arrays(full, args.test_queries, 300 + seed))


def bench_parts(arrays, args, seed: int):
    """The same three parts drawn from one bench's queries by a seeded permutation: test first,
    then the new-model candidates, then up to ``--train-queries`` training queries. A bench too
    small for the first two and one training query is refused (it left those parts empty, and
    the run failed later on a bare IndexError)."""
    needed = args.test_queries + max(args.sizes) + 1
    if arrays.n_queries < needed:
        raise SystemExit(f"the bench has {arrays.n_queries:,} queries; --test-queries "
                         f"{args.test_queries:,} + the largest of --sizes {max(args.sizes):,} + one "
                         f"training query need {needed:,}: lower them")
    order = np.random.default_rng(seed).permutation(arrays.n_queries)
    cuts = np.cumsum([args.test_queries, max(args.sizes), args.train_queries])
    test, new, train = (order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:cuts[2]])
    return arrays.subset(train), arrays.subset(new), arrays.subset(test)


def bench_source(uri: str):
    """(catalogue, every query of a long bench with MiniLM embeddings, through the cache)."""
    from r2ray.bench.io import read_bench
    from r2ray.embedding_cache import embed_texts
    from r2ray.encoders import MINILM, load_encoder
    from r2ray.predictor.data import bench_arrays
    from r2ray.training import bench_catalog

    catalog = bench_catalog(uri, None)
    arrays = bench_arrays(read_bench(uri, catalog), catalog)
    return catalog, arrays.with_embedding(embed_texts(load_encoder(MINILM),
                                                      arrays.query.tolist()))


def run_seed(seed: int, args, full, old, parts) -> dict[tuple[str, int], tuple[float, float]]:
    from r2ray.evaluation.method_scores import score_predictor
    from r2ray.predictor import make_predictor
    from r2ray.predictor.extend import arrays_over, extend_predictor, plan_extension

    extension = plan_extension(old, full)
    is_new = np.zeros(full.n_arms, dtype=bool)
    is_new[extension.new_arms] = True
    train, new_rows, test = parts
    new_rows = blank_arms(new_rows, is_new)
    settings = {"seed": seed} | ({"epochs": args.epochs} if args.epochs else {})
    out = {}

    def timed(key, fit):
        started = time.perf_counter()
        predictor = fit()
        seconds = time.perf_counter() - started
        out[key] = (score_predictor(predictor, test, full)["audc"], seconds)
        print(f"  seed {seed} {key[0]:>26} n={key[1]:>4}: AUDC {out[key][0]:.4f} "
              f"({seconds:.1f} s)", flush=True)
        return predictor

    old_train = arrays_over(train, full, old)
    network = timed(("old pool", 0), lambda: OldPool(
        make_predictor(args.predictor, **settings).fit(old_train, old), extension)).predictor
    ridge = timed(("per-arm ridge old pool", 0), lambda: OldPool(
        make_predictor("per_arm_ridge").fit(old_train, old), extension)).predictor
    timed(("all rows", 0), lambda: make_predictor(args.predictor, **settings).fit(train, full))
    old_rows = blank_arms(train, ~is_new)
    for n in args.sizes:
        rows = new_rows.subset(np.arange(n))
        timed(("warm start", n),
              lambda: extend_predictor(network, full, rows, prior=args.prior, seed=seed)[0])
        timed(("full retraining", n), lambda: make_predictor(args.predictor, **settings).fit(
            concat(old_rows, rows), full))
        timed(("per-arm ridge extended", n),
              lambda: extend_predictor(ridge, full, rows, seed=seed)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-model", default="Llama-3.1-70B-Instruct",
                        help="the model held out of the default catalogue and added back")
    parser.add_argument("--predictor", default="r2ray")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-queries", type=int, default=2000)
    parser.add_argument("--test-queries", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--prior", type=float, default=1.0, help="warm start's prior, pseudo-queries")
    parser.add_argument("--epochs", type=int, help="network epochs (default: the predictor's)")
    parser.add_argument("--bench", help="a long bench (its catalogue beside it) instead of the "
                        "world: parts drawn from its queries per seed, MiniLM embeddings")
    args = parser.parse_args()

    from r2ray.catalog import load_catalog
    from r2ray.predictor.extend import without_models

    if args.bench:
        full, arrays = bench_source(args.bench)
        parts = lambda seed: bench_parts(arrays, args, seed)  # noqa: E731
    else:
        full = load_catalog(None)
        parts = lambda seed: world_parts(full, args, seed)  # noqa: E731
    old = without_models(full, [args.new_model])
    started = time.perf_counter()
    results = [run_seed(seed, args, full, old, parts(seed)) for seed in range(args.seeds)]
    print()
    print(f"# Cold start of {args.new_model} ({len(full.arms) - len(old.arms)} arms) into "
          f"{len(old.models)} models ({args.bench or 'synthetic world'}); {args.predictor} on "
          f"{args.train_queries:,} training queries, test AUDC on {args.test_queries:,} queries "
          f"with every arm, {args.seeds} seeds (mean ± sd; {time.perf_counter() - started:.0f} s)")
    print()
    keys = list(results[0])
    print("| method | n new-model queries | test AUDC | fit s |")
    print("|---|---|---|---|")
    for key in keys:
        audc = np.array([r[key][0] for r in results])
        seconds = np.mean([r[key][1] for r in results])
        sd = audc.std(ddof=1) if len(audc) > 1 else 0.0
        print(f"| {key[0]} | {key[1] or '—'} | {audc.mean():.4f} ± {sd:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
