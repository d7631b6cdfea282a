"""Realised spend of batch routing on the synthetic world (prints figures; not a test).

Every spend claim should rest on what the routed arms *would really cost*, not on what the
predictor says they cost. The synthetic world knows each arm's true outcome, so:

1. train a predictor on world seed ``--seed-train`` (``--train-queries`` queries, world embeddings);
2. write a fresh backlog of world seed ``--seed-route`` (``--queries`` queries, world embeddings)
   and that same world's bench: the realised output tokens, quality and cost of *every* arm of
   every backlog query (checked: same query ids, in the same order, same input tokens);
3. route the backlog with ``route_batch`` at each ``--budgets`` per query in three modes: with
   the spend guarantee (``--guarantee``, the batch job's default 0.95), planned on predicted
   costs alone (``spend_guarantee=0``, the behaviour before the guarantee), and with
   ``strict_budget=True`` (Σ worst case at the caps ≤ budget);
4. read the routed rows back from each committed manifest's ``output.routed`` folder, bill each
   routed (query_id, model, budget) at its realised bench row (those rows are the run's actuals,
   reconciled by :mod:`r2ray.reconcile`), and print per budget: predicted spend, realised spend
   and worst case at the caps, each ÷ the budget; mean q̂ and realised mean quality; the wall
   time of the route; for the guarantee, κ and the quality given up against the plan without it.

Realised cost is the bench's ``cost_usd`` (the world bills the arm as sent, ``max_tokens`` cap
included, with :func:`r2ray.routing.call_cost_usd`: (input + the length instruction's estimated
tokens) × p_in + output × p_out at the catalogue's prices); where a bench row has no ``cost_usd``
it is computed so from the catalogue, and the script prints how far the recorded costs are from
that (they should agree to rounding). Money is summed in float64.

The routes share one local Ray that the script starts first (``address="local"``, so it never
attaches to a cluster some ``ray start`` left running; set RAY_ADDRESS to use one), so no route's
wall time includes Ray's start-up. On 2 cores the defaults take about 5 minutes.

Usage: python benchmarks/realised_spend.py [--queries 20000] [--train-queries 4000]
       [--seed-train 11] [--seed-route 12] [--budgets 3e-5 1e-4 3e-4 1e-3]
       [--predictor r2ray] [--guarantee 0.95] [--workers 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_COLUMNS = ["query_id", "model", "budget", "input_tokens", "output_tokens", "quality",
                 "cost_usd"]


# ---- setup -------------------------------------------------------------------------------------
def train_model(folder: str, catalog, n_queries: int, seed: int, predictor: str) -> str:
    """Fit ``predictor`` on world ``seed`` (bench + world embeddings) and save it for routing."""
    from r2ray.bench.synthetic import synth_backlog, synth_bench
    from r2ray.predictor import make_predictor, save_predictor
    from r2ray.predictor.data import bench_arrays

    bench = synth_bench(catalog, n_queries, seed=seed)
    queries = synth_backlog(catalog, n_queries, seed=seed, embeddings=True)
    fitted = make_predictor(predictor).fit(bench_arrays(bench, catalog, queries), catalog)
    save_predictor(fitted, folder, encoder_spec="precomputed")
    return folder


def write_route_world(folder: str, catalog, n_queries: int, seed: int) -> tuple[str, str]:
    """The backlog to route and its bench (every arm's realised outcome), same world and n."""
    from r2ray.bench.synthetic import write_world

    backlog = os.path.join(folder, "backlog", "part-0.parquet")
    bench = os.path.join(folder, "bench", "bench.parquet")
    os.makedirs(os.path.dirname(backlog))
    os.makedirs(os.path.dirname(bench))
    write_world(catalog, n_queries=n_queries, seed=seed, bench_uri=bench, backlog_uri=backlog,
                embeddings=True, chunk_queries=8192)
    return backlog, bench


def read_bench_outcomes(bench_uri: str, backlog_uri: str, catalog):
    """The bench's realised rows (BENCH_COLUMNS), after checking that it describes exactly the
    backlog's queries, in order, with its input tokens, every arm once. Returns (table, cost
    note)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from r2ray.predictor.data import arm_positions
    from r2ray.routing import call_cost_usd

    backlog = pq.read_table(backlog_uri, columns=["query_id", "input_tokens"])
    schema = pq.read_schema(bench_uri)
    columns = [c for c in BENCH_COLUMNS if c in schema.names]
    bench = pq.read_table(bench_uri, columns=columns)
    bench_ids = pc.unique(bench.column("query_id"))       # first-seen order
    if bench_ids.to_pylist() != backlog.column("query_id").to_pylist():
        sys.exit(f"the bench {bench_uri} and the backlog {backlog_uri} describe different "
                 f"queries ({len(bench_ids):,} vs {backlog.num_rows:,} ids, or another order)")
    if bench.num_rows != backlog.num_rows * catalog.n_arms:
        sys.exit(f"the bench has {bench.num_rows:,} rows, not {backlog.num_rows:,} queries × "
                 f"{catalog.n_arms} arms")
    first = bench.group_by("query_id", use_threads=False).aggregate(
        [("input_tokens", "min"), ("input_tokens", "max")])
    joined = backlog.join(first, "query_id")
    if not (pc.all(pc.equal(joined.column("input_tokens"), joined.column("input_tokens_min")))
            .as_py() and pc.all(pc.equal(joined.column("input_tokens"),
                                         joined.column("input_tokens_max"))).as_py()):
        sys.exit("the bench's input tokens differ from the backlog's")

    arm = arm_positions(catalog, bench.column("model"), bench.column("budget").to_numpy(),
                        bench_uri)
    priced = call_cost_usd(catalog, bench.column("input_tokens").to_numpy(),
                           bench.column("output_tokens").to_numpy(), arm)
    if "cost_usd" in bench.column_names:
        recorded = bench.column("cost_usd").to_numpy(zero_copy_only=False).astype(np.float64)
        present = ~np.isnan(recorded)
        gap = float(np.max(np.abs(recorded[present] - priced[present])
                           / np.maximum(priced[present], 1e-300))) if present.any() else 0.0
        note = (f"realised cost = the bench's cost_usd ({present.mean():.1%} of rows; largest "
                f"relative gap to routing.call_cost_usd at catalogue prices: {gap:.1e})")
        if not present.all():
            note += "; catalogue prices where it is null"
        bench = bench.drop_columns(["cost_usd"])
        priced = np.where(present, recorded, priced)
    else:
        note = "realised cost = routing.call_cost_usd at catalogue prices (no cost_usd)"
    # the actuals carry the bill: reconcile would price a null at the query's tokens alone
    return bench.append_column("cost_usd", pa.array(priced, pa.float64())), note


def start_ray() -> float:
    """A fresh local Ray for the routes (seconds to start it), unless RAY_ADDRESS names one.

    ``route_batch`` would start the same itself, but with no address Ray attaches to any cluster
    a ``ray start`` left on this machine; and starting it here keeps its start-up out of the
    first route's wall time."""
    import ray
    from ray.data import DataContext

    start = time.perf_counter()
    # as route_batch does: Ray 2.60 logs a token-auth notice on every local start
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    if not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - start


# ---- one route ---------------------------------------------------------------------------------
def route(backlog: str, model: str, out: str, run_id: str, budget: float, strict: bool,
          guarantee: float, workers: int) -> tuple[dict | None, float, str | None]:
    """``route_batch`` at ``budget`` USD per query; (committed manifest or None, wall s, error)."""
    from r2ray.batch import route_batch
    from r2ray.batch.config import route_config
    from r2ray.errors import R2RayError
    from r2ray.manifest import RunPaths, read_manifest

    config = route_config(input=backlog, output=out, model=model, budget_per_query_usd=budget,
                          strict_budget=strict, spend_guarantee=guarantee, run_id=run_id,
                          workers=workers,
                          tracking_uri=f"sqlite:///{out}/mlflow.db")
    start = time.perf_counter()
    try:
        route_batch(config)
    except R2RayError as err:   # e.g. a strict budget below every query's cheapest worst case
        return None, time.perf_counter() - start, str(err)
    wall = time.perf_counter() - start
    return read_manifest(RunPaths(out, run_id)), wall, None   # the committed one, from storage


def realised_figures(manifest: dict, bench, catalog) -> dict:
    """The run's routed rows billed at their realised bench rows (reconciled as the run's
    actuals); spend and quality figures."""
    import numpy as np
    import pyarrow.compute as pc

    from r2ray.reconcile import actuals_from_table, read_routed, reconcile

    routed = read_routed(manifest)
    n, run_id = routed.num_rows, manifest["run_id"]
    distinct = pc.count_distinct(routed.column("query_id")).as_py()
    if n != manifest["counts"]["routed"] or distinct != n:
        sys.exit(f"run {run_id}: {n:,} routed rows read back, manifest says "
                 f"{manifest['counts']['routed']:,} (or a query routed twice)")
    key = ["query_id", "model", "budget"]
    billed = bench.join(routed.select(key), key, join_type="left semi")   # what the run would bill
    rec = reconcile(manifest, routed, actuals_from_table(billed, "bench"), catalog)
    if rec.counts["matched"] != n or rec.invalid:
        sys.exit(f"run {run_id}: {n - rec.counts['matched']:,} routed rows have no realised row "
                 f"in the bench (or one matched several: {rec.invalid})")
    figures, spend = rec.overall, manifest["spend"]
    if not np.isclose(figures["planned_all_usd"], spend["predicted_usd"], rtol=1e-9, atol=0):
        print(f"warning: run {run_id}: Σ predicted of the routed rows "
              f"${figures['planned_all_usd']:.9g} ≠ the manifest's ${spend['predicted_usd']:.9g}",
              file=sys.stderr)
    # the manifest's worst case also prices the length instruction the prompt carries (its UTF-8
    # bytes), which the world's input tokens (the query's alone) leave out: at most, not equal
    if figures["worst_case_usd"] > spend["worst_case_usd"] * (1 + 1e-9):
        print(f"warning: run {run_id}: Σ worst case of the routed rows at their input tokens "
              f"${figures['worst_case_usd']:.9g} > the manifest's ${spend['worst_case_usd']:.9g}",
              file=sys.stderr)
    budget = float(spend["budget_usd"])
    return {
        "routed": n, "budget_usd": budget,
        "predicted": spend["predicted_usd"] / budget,
        "realised": figures["realised_over_budget"],
        "worst": spend["worst_case_usd"] / budget,
        "q_hat": figures["mean_q_hat"],
        "quality": figures["mean_quality"],
        "kappa": (spend.get("guarantee") or {}).get("inflation", 1.0),
    }


# ---- report ------------------------------------------------------------------------------------
def table_lines(rows: list[tuple[float, dict | None, float, str | None]],
                baseline: list | None = None) -> list[str]:
    """Markdown rows per budget; with ``baseline`` (the same budgets without the guarantee) also
    κ and the realised quality given up against it, as a share of that plan's."""
    extra = " κ | quality given up |" if baseline else ""
    lines = ["| budget per query | predicted / budget | **realised / budget** | worst case at "
             "caps / budget | mean q̂ | realised quality | route wall s |" + extra,
             "|---|---|---|---|---|---|---|" + ("---|---|" if baseline else "")]
    for i, (budget, figures, wall, error) in enumerate(rows):
        if figures is None:
            lines.append(f"| {budget_label(budget)} | — | — | — | — | — | {wall:.1f} "
                         f"(refused: {error[:300]}) |" + (" — | — |" if baseline else ""))
            continue
        line = (f"| {budget_label(budget)} | {figures['predicted']:.3f} | "
                f"**{figures['realised']:.3f}** | {figures['worst']:.3f} | "
                f"{figures['q_hat']:.3f} | {figures['quality']:.3f} | {wall:.1f} |")
        if baseline:
            free = baseline[i][1]
            given_up = "—" if free is None else \
                f"{(free['quality'] - figures['quality']) / free['quality']:.2%}"
            line += f" {figures['kappa']:.4f} | {given_up} |"
        lines.append(line)
    return lines


def budget_label(budget: float) -> str:
    """$3e-5, $1.5e-4: the way issue 10 writes budgets."""
    mantissa, exponent = f"{budget:.3e}".split("e")
    return f"${mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _git_head() -> str:
    try:
        head = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + (" (+ local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000, help="backlog size to route")
    parser.add_argument("--train-queries", type=int, default=4_000)
    parser.add_argument("--seed-train", type=int, default=11, help="world seed to train on")
    parser.add_argument("--seed-route", type=int, default=12, help="world seed of the backlog")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3],
                        help="budgets in USD per query")
    parser.add_argument("--predictor", default="r2ray", help="a key of r2ray.predictor.PREDICTORS")
    parser.add_argument("--guarantee", type=float, default=0.95,
                        help="--spend-guarantee of the guaranteed routes (0 < P < 1)")
    parser.add_argument("--catalog", help="catalogue YAML (default: the package's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="work folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    if args.queries < 1 or args.train_queries < 1 or any(b <= 0 for b in args.budgets):
        parser.error("--queries, --train-queries and every budget must be positive")
    if not 0 < args.guarantee < 1:
        parser.error("--guarantee must be a probability strictly between 0 and 1")
    if args.seed_train == args.seed_route:
        print("warning: training and routing on the same world seed: the backlog is the "
              "training data", file=sys.stderr)

    from r2ray.catalog import load_catalog

    catalog = load_catalog(args.catalog)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if args.out:
        work = os.path.join(os.path.abspath(args.out), f"realised-{stamp}")
        os.makedirs(work)
    else:
        work = tempfile.mkdtemp(prefix="r2ray-realised-")
    try:
        run(args, catalog, work, stamp)
    finally:
        try:
            import ray
            ray.shutdown()
        except ImportError:
            pass
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


def run(args, catalog, work: str, stamp: str) -> None:
    started = time.perf_counter()
    t0 = time.perf_counter()
    model = train_model(os.path.join(work, "model"), catalog, args.train_queries,
                        args.seed_train, args.predictor)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    backlog, bench_uri = write_route_world(os.path.join(work, "world"), catalog, args.queries,
                                           args.seed_route)
    bench, cost_note = read_bench_outcomes(bench_uri, backlog, catalog)
    world_s = time.perf_counter() - t0
    print(f"trained {args.predictor} on world seed {args.seed_train}, {args.train_queries:,} "
          f"queries, world embeddings, in {train_s:.1f} s; wrote world seed {args.seed_route}: "
          f"{args.queries:,}-query backlog + its {bench.num_rows:,}-row bench in {world_s:.1f} s "
          f"(query ids checked equal)", file=sys.stderr, flush=True)

    ray_s = start_ray()
    blocks = {}
    modes = {"guaranteed": (False, args.guarantee), "planned": (False, 0.0),
             "strict": (True, 0.0)}
    for mode, (strict, guarantee) in modes.items():
        rows = []
        for budget in args.budgets:
            run_id = f"{mode}-{budget_label(budget)[1:]}"
            manifest, wall, error = route(backlog, model, os.path.join(work, "runs"), run_id,
                                          budget, strict, guarantee, args.workers)
            figures = None if manifest is None else realised_figures(manifest, bench, catalog)
            if figures is not None and figures["routed"] != args.queries:
                print(f"warning: run {run_id} routed {figures['routed']:,} of {args.queries:,} "
                      "queries (see its deferred/ and quarantine/)", file=sys.stderr)
            rows.append((budget, figures, wall, error))
            print(f"routed {run_id} in {wall:.1f} s", file=sys.stderr, flush=True)
        blocks[mode] = rows

    print(f"# Realised spend on the synthetic world ({stamp}, r2ray {_version()}, "
          f"commit {_git_head()})")
    print(f"train: world seed {args.seed_train}, {args.train_queries:,} queries, world embeddings, "
          f"predictor {args.predictor!r} ({train_s:.0f} s); route: world seed {args.seed_route}, "
          f"{args.queries:,} queries, {catalog.n_arms} arms, route_batch with {args.workers} "
          f"workers on " + (f"Ray at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS")
                            else f"a local Ray started before the routes ({ray_s:.0f} s)"))
    print(cost_note)
    print()
    print(f"With the spend guarantee (spend_guarantee={args.guarantee}, the default):")
    print()
    print("\n".join(table_lines(blocks["guaranteed"], baseline=blocks["planned"])))
    print()
    print("Planned on predicted costs alone (spend_guarantee=0):")
    print()
    print("\n".join(table_lines(blocks["planned"])))
    print()
    print("strict_budget=True (the solve spends worst cases at the caps):")
    print()
    print("\n".join(table_lines(blocks["strict"])))
    print()
    print(f"total wall time {time.perf_counter() - started:.0f} s; work folder {work}"
          + ("" if args.out else " (temporary, removed)"))


def _version() -> str:
    from r2ray import __version__
    return __version__


if __name__ == "__main__":
    main()
