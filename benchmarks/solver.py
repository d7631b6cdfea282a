"""Benchmark of the exact global-budget solver; prints its figures (it is not a timed test).

    python benchmarks/solver.py            # full sizes (several minutes, ~4 GB of RAM)
    python benchmarks/solver.py --quick    # the same figures on small sizes

Figures, all measured side by side in one run (fastest of 2-3 runs), after one warm-up call of
the numba hull kernel (its compile or cache load, printed first, is not in the figures):
1. N x K = 2,000,000 x 176: time of hull_steps and of solve_budget, each divided by the time of
   one vectorised pass computing argmax_j(q - λc) for a fixed λ (the cost of reading the data).
2. HiGHS (scipy linprog) at N = 20,000: speed-up and LP value, on all arms (with a time
   limit) and on the hull arms only.
3. Time per query at N = 1e5, 1e6, 4e6 (data generated and hulled per chunk; only steps kept).
4. solve_dataset at N = 50,000 and 200,000 in 16 blocks, as the batch job calls it (a ``then``
   per block, outputs fetched, a warmed SolveWorker), in memory and forced onto the distributed passes, in
   one row with one read pass, the hull and the single-node solve of the same scores, and the
   ratios; bit-identical check; the in-memory solve's peak memory per byte of step columns.
   ``then`` returns each block's arms (what the check needs); the job's assign returns a few
   rows of stats per block instead, so the in-memory path is also timed with a ``then`` that
   returns one summary row per block ("summary out": its arms' count and sum, checked too).
    python benchmarks/solver.py --figures 1,4    # only those figures
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from r2ray.solver import concat_steps, hull_steps, solve_budget

# Eleven models (USD per million input, output tokens) and sixteen length budgets (0 = default)
PRICES_PER_M = np.array([(0.05, 0.08), (0.1, 0.1), (0.15, 0.6), (0.2, 0.2), (0.3, 0.5),
                         (0.5, 1.5), (0.8, 4.0), (1.1, 4.4), (2.5, 10.0), (3.0, 15.0),
                         (5.0, 15.0)])
BUDGETS = np.array([10, 20, 30, 40, 50, 80, 100, 150, 200, 300, 500, 800, 1200, 2000, 4000, 0],
                   np.float32)
CHUNK = 65_536           # rows generated (and hulled) at a time
BUDGET_SHARE = 0.3       # budget = cheapest total + this share of the money all steps need
RAY_REPEAT = 5           # Ray rounds vary most on a shared machine: fastest of this many


def synthetic_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted quality and cost (float32 [n, 176]) of an R2-like world: saturating quality
    in the length budget, model skill and query difficulty, cost = input + capped output."""
    rng = np.random.default_rng(seed)
    m, b = len(PRICES_PER_M), len(BUDGETS)
    noise = lambda *shape: rng.random(shape, dtype=np.float32) - np.float32(0.5)  # noqa: E731
    in_tokens = np.exp(np.float32(5.5) + np.float32(1.6) * noise(n, 1, 1))
    skill = np.linspace(0.35, 0.9, m, dtype=np.float32)[None, :, None]
    natural = np.exp(np.float32(6.0) + noise(n, m, 1))          # tokens if unconstrained
    ceiling = np.clip(skill + np.float32(0.4) * noise(n, 1, 1) + np.float32(0.1) * noise(n, m, 1),
                      0, 1)
    tokens = np.where(BUDGETS == 0, natural, np.minimum(BUDGETS, natural))
    quality = ceiling * (1 - np.exp(tokens / (np.float32(-0.3) * natural)))
    quality += np.float32(0.06) * noise(n, m, b)
    price_in, price_out = (PRICES_PER_M.T / 1e6).astype(np.float32)[:, None, :, None]
    cost = in_tokens * price_in + np.float32(0.9) * tokens * price_out
    return np.clip(quality, 0, 1).reshape(n, m * b), cost.reshape(n, m * b)


def fill(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, 176] float32 scores generated chunk by chunk into preallocated arrays."""
    q = np.empty((n, PRICES_PER_M.shape[0] * BUDGETS.size), np.float32)
    c = np.empty_like(q)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        q[start:stop], c[start:stop] = synthetic_scores(stop - start, seed + start)
    return q, c


def read_pass(q: np.ndarray, c: np.ndarray, lam: float, rows: int = 4096) -> np.ndarray:
    """argmax_j (q - λc) for every query: the reference cost of reading the data once."""
    lam = np.float32(lam)
    return np.concatenate([np.argmax(q[s:s + rows] - lam * c[s:s + rows], axis=1)
                           for s in range(0, q.shape[0], rows)])


def seconds(fn, *args, repeat: int = 1, **kwargs):
    """(result of the last call, fastest wall time in seconds)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return out, best


def budget_for(steps) -> float:
    return float(steps.base_c.sum() + BUDGET_SHARE * steps.dc.sum())


def warm_up() -> None:
    """Compile (or load from numba's cache) the hull kernel for the dtypes used below."""
    tiny = np.ones((2, 3), np.float32)
    _, t = seconds(hull_steps, tiny, tiny)
    print(f"[0] hull kernel warm-up (numba compile or cache load): {t:.2f} s")


def figure_read_ratio(n: int) -> None:
    q, c = fill(n)
    steps, t_hull = seconds(hull_steps, q, c, repeat=2)
    result, t_solve = seconds(solve_budget, steps, budget_for(steps), repeat=2)
    _, t_read = seconds(read_pass, q, c, result.certificate.lam, repeat=3)
    print(f"\n[1] N={n:,} x K={q.shape[1]} ({q.nbytes * 2 / 1e9:.1f} GB of float32 scores), "
          f"{steps.n_steps / n:.2f} hull steps per query")
    print(f"    read pass argmax_j(q - λc):  {t_read:7.3f} s")
    print(f"    hull_steps:                  {t_hull:7.3f} s   = {t_hull / t_read:5.1f} x read")
    print(f"    solve_budget (from steps):   {t_solve:7.3f} s   = {t_solve / t_read:5.1f} x read"
          f"   (goal <= 3)")
    print(f"    hull + solve:                {t_hull + t_solve:7.3f} s   = "
          f"{(t_hull + t_solve) / t_read:5.1f} x read")
    print(f"    λ* = {result.certificate.lam:.6g} quality/USD, gap = {result.certificate.gap:.3g}")


def highs_lp(q: np.ndarray, c: np.ndarray, budget: float, time_limit: float):
    """(LP value or None, seconds) of scipy's HiGHS interior point on the arms given."""
    import scipy.sparse as sparse
    from scipy.optimize import linprog
    n, k = q.shape
    one_arm = sparse.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), np.arange(n * k))),
                                shape=(n, n * k))
    cost_row = sparse.csr_matrix(c.reshape(1, -1).astype(np.float64))
    start = time.perf_counter()
    res = linprog(-q.ravel().astype(np.float64), A_ub=cost_row, b_ub=[budget], A_eq=one_arm,
                  b_eq=np.ones(n), bounds=(0, None), method="highs-ipm",
                  options={"time_limit": time_limit})
    return (-res.fun if res.status == 0 else None), time.perf_counter() - start


def hull_arms_only(steps, q, c) -> tuple[np.ndarray, np.ndarray]:
    """[n, W] arrays of each query's hull vertices (padded by repeating the base)."""
    counts = steps.steps_per_query
    width = int(counts.max(initial=0)) + 1
    arm = np.repeat(steps.base_arm[:, None], width, axis=1)
    for t in range(width - 1):
        rows = np.flatnonzero(counts > t)
        arm[rows, t + 1:] = steps.step_arm[steps.offsets[rows] + t][:, None]
    rows = np.arange(q.shape[0])[:, None]
    return q[rows, arm], c[rows, arm]


def figure_highs(n: int, time_limit: float) -> None:
    q, c = synthetic_scores(n, seed=20_000)
    (steps, result), t_ours = seconds(_hull_and_solve, q, c)
    budget, lp = result.certificate.budget_usd, result.certificate.lp_value
    print(f"\n[2] HiGHS (scipy linprog, interior point) at N={n:,}; ours (hull + solve) "
          f"{t_ours:.3f} s, LP value {lp:.10g}")
    value, t_full = highs_lp(q, c, budget, time_limit)
    if value is None:
        print(f"    all {q.shape[1]} arms: no answer within {time_limit:.0f} s -> "
              f"speed-up >= {t_full / t_ours:,.0f}x")
    else:
        print(f"    all {q.shape[1]} arms: {t_full:8.2f} s -> speed-up {t_full / t_ours:,.0f}x, "
              f"LP value {value:.10g} (rel diff {abs(value - lp) / lp:.1e})")
    hq, hc = hull_arms_only(steps, q, c)
    value, t_hull = highs_lp(hq, hc, budget, time_limit)
    shown = ("no answer" if value is None
             else f"LP value {value:.10g} (rel diff {abs(value - lp) / lp:.1e})")
    print(f"    hull arms only ({hq.shape[1]} per query): {t_hull:8.2f} s -> speed-up "
          f"{t_hull / t_ours:,.0f}x, {shown}")


def _hull_and_solve(q, c):
    steps = hull_steps(q, c)
    return steps, solve_budget(steps, budget_for(steps))


def figure_scaling(sizes: list[int]) -> None:
    print("\n[3] time per query (generated and hulled per chunk; only steps kept)")
    rows = []
    for n in sizes:
        parts, t_hull = [], 0.0
        for start in range(0, n, CHUNK):
            q, c = synthetic_scores(min(CHUNK, n - start), seed=start + 1)
            part, t = seconds(hull_steps, q, c)
            parts.append(part)
            t_hull += t
        steps = concat_steps(parts)
        _, t_solve = seconds(solve_budget, steps, budget_for(steps), repeat=2)
        rows.append((n, t_hull / n * 1e6, t_solve / n * 1e6))
        print(f"    N={n:>9,}: hull {t_hull / n * 1e6:6.2f} µs/query, solve "
              f"{t_solve / n * 1e6:6.3f} µs/query, total {(t_hull + t_solve) / n * 1e6:6.2f}")
    totals = np.array([h + s for _, h, s in rows])
    solves = np.array([s for _, _, s in rows])
    print(f"    spread around the mean: total {_spread(totals)}, solve alone {_spread(solves)} "
          "(goal: within ±25%)")


def _spread(values: np.ndarray) -> str:
    mean = values.mean()
    return f"{(values.min() / mean - 1) * 100:+.0f}% .. {(values.max() / mean - 1) * 100:+.0f}%"


def figure_ray(sizes: list[int], n_blocks: int = 16) -> None:
    """solve_dataset over Ray Data blocks (as the batch job calls it: ``then`` per block, its
    outputs fetched; the in-memory path in a SolveWorker started and warmed beforehand, as the
    job does) and forced onto the distributed passes, beside one read pass, the hull and the
    single-node solve of the same scores."""
    import ray
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except Exception as err:            # a raylet that misses its 30 s start on a busy machine
        print(f"\n[4] Ray did not start: {err}")
        return
    try:
        print(f"\n[4] solve_dataset, {n_blocks} blocks on a local Ray (2 CPUs); seconds, fastest "
              f"of {RAY_REPEAT} on Ray, of 2 in memory (read of 3)")
        print("    N        read    hull (x read)   solve 1-node (x read)   "
              "in memory (x 1-node)   summary out (x 1-node)   distributed (x 1-node)   "
              "bit-identical")
        for n in sizes:
            _ray_row(n, n_blocks)
        _print_memory(sizes[-1])
    finally:
        ray.shutdown()


def _ray_row(n: int, n_blocks: int) -> None:
    from r2ray.solver.distributed import start_solver, steps_dataset
    q, c = fill(n, seed=7)
    steps, t_hull = seconds(hull_steps, q, c, repeat=2)
    budget = budget_for(steps)
    single, t_single = seconds(solve_budget, steps, budget, repeat=2)
    _, t_read = seconds(read_pass, q, c, single.certificate.lam, repeat=3)
    dataset = steps_dataset(steps, n_blocks=n_blocks).materialize()
    solver = start_solver()
    for limit in (None, 0):                     # start the workers both paths use
        _job_solve(dataset, budget, limit, solver)
    (memory, arm_m), t_memory = seconds(_job_solve, dataset, budget, None, solver,
                                        repeat=RAY_REPEAT)
    (summed, summary), t_summary = seconds(_job_solve, dataset, budget, None, solver, True,
                                           repeat=RAY_REPEAT)
    (blocks, arm_b), t_blocks = seconds(_job_solve, dataset, budget, 0, solver,
                                        repeat=RAY_REPEAT)
    same = all(r.certificate == single.certificate for r in (memory, summed, blocks)) and \
        np.array_equal(arm_m, single.arm) and np.array_equal(arm_b, single.arm) and \
        summary == (len(single.arm), int(single.arm.sum()))
    print(f"    {n:<8,} {t_read:6.3f}  {t_hull:6.3f} ({t_hull / t_read:4.1f}x)   "
          f"{t_single:6.3f} ({t_single / t_read:4.1f}x)         "
          f"{t_memory:6.3f} ({t_memory / t_single:5.1f}x)       "
          f"{t_summary:6.3f} ({t_summary / t_single:5.1f}x)          "
          f"{t_blocks:6.3f} ({t_blocks / t_single:6.1f}x)        {same}  "
          f"[in memory: {memory.in_memory}, {summed.in_memory}, {blocks.in_memory}]")


def _job_solve(dataset, budget: float, limit, solver, summary: bool = False):
    """solve_dataset with a per-block ``then`` (as the batch job's assign) and its outputs
    fetched; returns (result, arms in query order), or with ``summary`` (each block's output one
    row, as small as the assign's stats) (result, (arms counted, their sum))."""
    import pyarrow as pa
    import ray
    from r2ray.solver.distributed import solve_dataset
    then = (_arm_summary, {}) if summary else (pa.Table.select, {"columns": ["query_pos", "arm"]})
    result = solve_dataset(dataset, budget, local_limit_bytes=limit, solver=solver, then=then)
    table = pa.concat_tables(ray.get(result.arms.to_arrow_refs()))
    if summary:
        return result, (int(table.column("rows").to_numpy().sum()),
                        int(table.column("arm_sum").to_numpy().sum()))
    return result, table.sort_by("query_pos").column("arm").to_numpy()


def _arm_summary(table):
    """One row per block: its rows and the sum of their arms."""
    import pyarrow as pa
    arm = table.column("arm").to_numpy()
    return pa.table({"rows": [len(arm)], "arm_sum": [int(arm.sum())]})


def _print_memory(n: int) -> None:
    """Peak memory numpy allocates during the in-memory solve, per byte of step columns: what
    a SolveWorker needs for the step columns ``solve_dataset`` gathers (its default limit)."""
    import tracemalloc
    from r2ray.solver.table import steps_to_table
    q, c = fill(n, seed=7)
    steps = hull_steps(q, c)
    del q, c
    columns = steps_to_table(steps).nbytes
    tracemalloc.start()
    solve_budget(steps, budget_for(steps))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"    solver memory at N={n:,}: step columns {columns / 1e6:.0f} MB, the solve's peak "
          f"allocation {peak / 1e6:.0f} MB = {peak / columns:.1f}x the columns")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--highs-time-limit", type=float, default=None,
                        help="seconds HiGHS may take on all arms (default 150; 60 with --quick)")
    parser.add_argument("--figures", default="1,2,3,4", help="which figures (default all)")
    parser.add_argument("--ray-sizes", default="50000,200000",
                        help="queries per solve_dataset row of figure 4")
    args = parser.parse_args(argv)
    scale = 20 if args.quick else 1
    limit = args.highs_time_limit or (60.0 if args.quick else 150.0)
    figures = {int(f) for f in args.figures.split(",")}
    warm_up()
    if 1 in figures:
        figure_read_ratio(2_000_000 // scale)
    if 2 in figures:
        figure_highs(20_000 // scale, limit)
    if 3 in figures:
        figure_scaling([100_000 // scale, 1_000_000 // scale, 4_000_000 // scale])
    if 4 in figures:
        figure_ray([int(n) for n in args.ray_sizes.split(",")])


if __name__ == "__main__":
    main()
