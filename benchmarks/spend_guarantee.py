"""The spend guarantee over many fresh backlogs (prints figures; not a test).

``benchmarks/realised_spend.py`` bills one backlog through the whole batch job; a probability needs
many. This trains ``--predictor`` on synthetic world seed ``--seed-train`` (``--train-queries``,
world embeddings), then routes ``--seeds`` fresh backlogs of ``--queries`` queries (world seeds
after the training one) in memory exactly as the batch job routes them
(``r2ray.evaluation.adherence.guarantee_sweep``: ``arm_scores`` → ``plan_budget`` → the exact solve)
at each ``--budgets`` per query, with the guarantee at ``--guarantee`` and without it, and bills
every routed arm at the world's realised outcome. Per budget it prints realised ÷ budget (mean,
max, backlogs over budget), κ and the realised quality given up for the guarantee.

With ``--bench NAME`` (``routerarena``, ``paretobandit``, or their small copies
``tests:routerarena``, ``tests:paretobandit``) it runs on a real bench instead
(``r2ray.evaluation.adherence.guarantee_on_splits``): per seed, each of ``--predictors`` is
fitted on 80 % of the queries and the other 20 % are routed as one backlog at ``--levels`` (the
evaluation's budget levels: 0 = every query on its cheapest arm, 1 = the best model's default
arm, in log USD), billed at the bench's recorded costs. A level counts only where it binds
(the plan without the guarantee spends ≥ 97 % of the budget).

Usage: python benchmarks/spend_guarantee.py [--predictor r2ray] [--train-queries 4000]
       [--queries 20000] [--seeds 20] [--budgets 3e-5 1e-4 3e-4 1e-3] [--guarantee 0.95]
       python benchmarks/spend_guarantee.py --bench routerarena [--predictors per_arm_ridge,averaged]
       [--seeds 40] [--levels 0.05 0.15 0.3 0.5]
On 2 cores the world's defaults take about 10 minutes; RouterArena, 40 seeds, two predictors
about 5.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", default="r2ray", help="a key of r2ray.predictor.PREDICTORS")
    parser.add_argument("--train-queries", type=int, default=4000)
    parser.add_argument("--seed-train", type=int, default=11)
    parser.add_argument("--queries", type=int, default=20_000, help="queries per backlog")
    parser.add_argument("--seeds", type=int, default=20, help="fresh backlogs to route")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3],
                        help="budgets in USD per query")
    parser.add_argument("--guarantee", type=float, default=0.95)
    parser.add_argument("--bench", help="a real bench instead of the world (see the docstring)")
    parser.add_argument("--predictors", default="per_arm_ridge,averaged",
                        help="with --bench: comma-separated keys of r2ray.predictor.PREDICTORS")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.05, 0.15, 0.3, 0.5],
                        help="with --bench: budget levels, fractions of the log-USD span")
    args = parser.parse_args()
    if not 0 < args.guarantee < 1:
        parser.error("--guarantee must be a probability strictly between 0 and 1")
    if args.bench:
        return real_bench(args)

    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.catalog import load_catalog
    from r2ray.evaluation.adherence import guarantee_sweep
    from r2ray.predictor import make_predictor
    from r2ray.predictor.data import bench_arrays

    catalog = load_catalog(None)
    start = time.perf_counter()
    train = bench_arrays(synth_bench(catalog, args.train_queries, seed=args.seed_train), catalog,
                         synth_backlog(catalog, args.train_queries, seed=args.seed_train,
                                       embeddings=True))
    predictor = make_predictor(args.predictor).fit(train, catalog)
    fit_s = time.perf_counter() - start
    seeds = range(args.seed_train + 1, args.seed_train + 1 + args.seeds)
    start = time.perf_counter()
    sweep = guarantee_sweep(predictor, catalog, seeds, args.queries, args.budgets,
                            (args.guarantee, 0.0))
    print(f"# Spend guarantee over {args.seeds} fresh backlogs of {args.queries:,} queries "
          f"(world seeds {seeds.start}–{seeds.stop - 1})")
    print(f"{args.predictor} trained on world seed {args.seed_train}, {args.train_queries:,} "
          f"queries ({fit_s:.0f} s); sweep {time.perf_counter() - start:.0f} s; its simulation "
          f"rests on {predictor.spend_simulation_.n_queries:,} held-out queries")
    print()
    print(f"| budget per query | guarantee {args.guarantee}: realised / budget mean, max | over "
          "budget | κ | without: realised / budget mean, max | over budget | quality given up "
          "mean, max |")
    print("|---|---|---|---|---|---|---|")
    kept, free = sweep[args.guarantee], sweep[0.0]
    for j, budget in enumerate(args.budgets):
        given_up = (free[:, j, 1] - kept[:, j, 1]) / free[:, j, 1]
        print(f"| ${budget:g} | {kept[:, j, 0].mean():.3f}, {kept[:, j, 0].max():.3f} | "
              f"{int((kept[:, j, 0] > 1).sum())}/{args.seeds} | {kept[:, j, 2].mean():.4f} | "
              f"{free[:, j, 0].mean():.3f}, {free[:, j, 0].max():.3f} | "
              f"{int((free[:, j, 0] > 1).sum())}/{args.seeds} | "
              f"{given_up.mean():.2%}, {given_up.max():.2%} |")
    print()
    print("realised = Σ over routed arms of the world's realised cost_usd, float64; quality given "
          "up = (unguaranteed − guaranteed realised mean quality) ÷ unguaranteed, per backlog")


def real_bench(args) -> None:
    import functools
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import small_data

    from r2ray.evaluation.adherence import guarantee_on_splits
    from r2ray.predictor import make_predictor

    benches = small_data.real_benches()
    if args.bench not in benches:
        raise SystemExit(f"no bench {args.bench!r} here; found: {', '.join(benches) or 'none'} "
                         f"(the full benches are read from {small_data.SHARED}; "
                         "R2RAY_SHARED_DATA=DIR reads them elsewhere)")
    with tempfile.TemporaryDirectory(prefix="r2ray-guarantee-") as folder:
        arrays, catalog = small_data.load_real(*benches[args.bench], folder)
    n_test = arrays.n_queries - int(round(arrays.n_queries * 0.8))
    print(f"# Spend guarantee {args.guarantee} on {args.bench}: {args.seeds} random 80/20 splits "
          f"of {arrays.n_queries:,} queries (backlogs of about {n_test} queries), "
          f"{catalog.n_arms} arms")
    print()
    print("| predictor | level | binds | over budget with the guarantee | realised / budget "
          "mean, max | κ mean | without: over budget | realised / budget max | quality given "
          "up mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in args.predictors.split(","):
        start = time.perf_counter()
        sweep = guarantee_on_splits(arrays, catalog, functools.partial(make_predictor, kind),
                                    range(args.seeds), args.levels, (args.guarantee, 0.0))
        kept, free = sweep[args.guarantee], sweep[0.0]
        for j, level in enumerate(args.levels):
            binds = kept[:, j, 3] >= 0.97
            k, f = kept[binds, j], free[binds, j]
            if not binds.any():
                print(f"| {kind} | {level:g} | 0/{args.seeds} | — | — | — | — | — | — |")
                continue
            given_up = (f[:, 1] - k[:, 1]) / f[:, 1]
            print(f"| {kind} | {level:g} | {int(binds.sum())}/{args.seeds} | "
                  f"**{int((k[:, 0] > 1).sum())}/{int(binds.sum())}** | {k[:, 0].mean():.3f}, "
                  f"{k[:, 0].max():.3f} | {k[:, 2].mean():.3f} | {int((f[:, 0] > 1).sum())} | "
                  f"{f[:, 0].max():.3f} | {given_up.mean():.2%} |")
        print(f"<!-- {kind}: {time.perf_counter() - start:.0f} s -->")
    print()
    print(f"over budget: realised > budget; with a {args.guarantee:.0%} guarantee about "
          f"{1 - args.guarantee:.0%} of binding backlogs may go over")


if __name__ == "__main__":
    main()
