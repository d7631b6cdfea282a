"""The spend guarantee over many fresh backlogs (prints figures; not a test).

``benchmarks/realised_spend.py`` bills one backlog through the whole batch job; a probability needs
many. This trains ``--predictor`` on synthetic world seed ``--seed-train`` (``--train-queries``,
world embeddings), then routes ``--seeds`` fresh backlogs of ``--queries`` queries (world seeds
after the training one) in memory exactly as the batch job routes them
(``r2ray.evaluation.adherence.guarantee_sweep``: ``arm_scores`` → ``plan_budget`` → the exact solve)
at each ``--budgets`` per query, with the guarantee at ``--guarantee`` and without it, and bills
every routed arm at the world's realised outcome. Per budget it prints realised ÷ budget (mean,
max, backlogs over budget), κ and the realised quality given up for the guarantee.

Usage: python benchmarks/spend_guarantee.py [--predictor r2ray] [--train-queries 4000]
       [--queries 20000] [--seeds 20] [--budgets 3e-5 1e-4 3e-4 1e-3] [--guarantee 0.95]
On 2 cores the defaults take about 10 minutes.
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
    args = parser.parse_args()
    if not 0 < args.guarantee < 1:
        parser.error("--guarantee must be a probability strictly between 0 and 1")

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


if __name__ == "__main__":
    main()
