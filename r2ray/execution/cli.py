"""``r2ray bench collect`` and ``r2ray execute``: argument parsing only."""

from __future__ import annotations

import argparse
import math

from r2ray.execution.graders import GRADER_NAMES


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-spend-usd", type=float, help="stop issuing calls before realised "
                        "spend plus the worst case of the calls in flight would pass this (USD; "
                        "counts what earlier runs into the same output spent)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the calls to make and their worst-case cost at the caps")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray",
                        help="Ray Data actor pool (default) or this process")
    parser.add_argument("--workers", type=int, default=1, help="Ray actors; the catalogue's "
                        "per-endpoint limits are shared among them")
    parser.add_argument("--batch-rows", type=int, default=8,
                        help="requests per part file (a kill loses at most the batches in flight)")
    parser.add_argument("--max-attempts", type=int, default=5,
                        help="tries per request (default 5)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="seconds per call, connect to last byte (default 60)")
    parser.add_argument("--resend-unrecorded", action="store_true",
                        help="send again the answers of a work folder written before r2ray "
                        "recorded each call's prompt (default: reuse them unchecked, with a "
                        "warning; a query edited under its id is always sent again otherwise)")
    parser.add_argument("--work", help="work folder: parts, failures, manifest (default: the "
                        "output's name without suffix + .work)")


def _engine_config(args: argparse.Namespace):
    from r2ray.execution.engine import EngineConfig
    from r2ray.execution.policy import RetryPolicy

    _check_engine_arguments(args)
    return EngineConfig(executor=args.executor, workers=args.workers,
                        batch_rows=args.batch_rows, max_spend_usd=args.max_spend_usd,
                        unrecorded="resend" if args.resend_unrecorded else "reuse",
                        retry=RetryPolicy(max_attempts=args.max_attempts,
                                          timeout_s=args.timeout_s))


def _check_engine_arguments(args: argparse.Namespace) -> None:
    """A count below 1, a timeout that is not a positive number of seconds or a spend cap that is
    not a finite amount is an error naming its flag (a NaN timeout failed deep inside the HTTP
    client; a zero one timed every call out)."""
    from r2ray.errors import R2RayError

    for flag, count in (("--workers", args.workers), ("--batch-rows", args.batch_rows),
                        ("--max-attempts", args.max_attempts)):
        if count < 1:
            raise R2RayError(f"{flag} {count}: give a whole number of at least 1")
    if not 0 < args.timeout_s < math.inf:   # NaN too
        raise R2RayError(f"--timeout-s {args.timeout_s}: give a finite number of seconds above 0")
    if args.max_spend_usd is not None and not 0 <= args.max_spend_usd < math.inf:
        raise R2RayError(f"--max-spend-usd {args.max_spend_usd}: give a finite, non-negative "
                         "amount (USD)")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    bench = commands.choices["bench"]
    bench_sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    collect = bench_sub.add_parser(
        "collect", help="answer queries with every (or k) arms of your pool, grade them → bench")
    collect.add_argument("--queries", required=True, help="query_id, query, optional category, "
                         "reference, grader (parquet or jsonl)")
    collect.add_argument("--catalog", required=True, help="catalogue with an endpoint per model")
    collect.add_argument("--out", required=True, help="bench to write (.parquet or .jsonl)")
    collect.add_argument("--arms", default="all", help="'all', or k arms per query dealt evenly")
    collect.add_argument("--seed", type=int, default=0)
    collect.add_argument("--grader", choices=GRADER_NAMES,
                         help="for queries without a `grader` (default: exact where there is a "
                              "reference, judge where not)")
    collect.add_argument("--judge-model", help="a model of --judge-catalog that judges answers "
                         "(grader 'judge', and every row with a reference, for agreement)")
    collect.add_argument("--judge-catalog", help="catalogue of the judge (default: --catalog)")
    _engine_arguments(collect)
    collect.set_defaults(handler=_collect)

    execute = commands.add_parser(
        "execute", help="run a committed batch run's routed prompts → actuals for reconcile")
    execute.add_argument("--run", required=True, metavar="RUN_URI",
                         help="the run folder, OUTPUT/RUN_ID, of a committed run")
    execute.add_argument("--out", required=True, metavar="ACTUALS",
                         help="actuals to write (.parquet or .jsonl)")
    execute.add_argument("--catalog", help="catalogue with the endpoints (default: the run's)")
    execute.add_argument("--tracking-uri", help="MLflow tracking URI, to find the run's catalogue")
    _engine_arguments(execute)
    execute.set_defaults(handler=_execute)


def _collect(args: argparse.Namespace) -> None:
    from r2ray.execution.collect import CollectConfig, collect, dry_run

    if args.arms != "all" and not args.arms.isdigit():
        from r2ray.errors import R2RayError

        raise R2RayError(f"--arms {args.arms!r}: give 'all' or a number of arms per query")
    config = CollectConfig(queries=args.queries, catalog=args.catalog, out=args.out,
                           work=args.work, arms=args.arms, seed=args.seed, grader=args.grader,
                           judge_model=args.judge_model, judge_catalog=args.judge_catalog,
                           engine=_engine_config(args))
    print(dry_run(config) if args.dry_run else collect(config).summary())


def _execute(args: argparse.Namespace) -> None:
    from r2ray.execution.execute import ExecuteConfig, dry_run, execute_run

    config = ExecuteConfig(run=args.run, out=args.out, work=args.work, catalog=args.catalog,
                           tracking_uri=args.tracking_uri, engine=_engine_config(args))
    print(dry_run(config) if args.dry_run else execute_run(config).summary())
