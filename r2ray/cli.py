"""The ``r2ray`` command: argument parsing only; every command calls one library function.

Errors a user can fix (:class:`r2ray.errors.R2RayError`, a path that cannot be used) print one
clear line and exit with status 2; ``route`` exits 3 when it committed a run that routed nothing;
Ctrl-C prints one line and exits 130, as a shell reports an interrupted tool, and SIGTERM (a
Kubernetes pod deleted) stops a run the same way and exits 143; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

from r2ray.errors import R2RayError, Terminated, raise_terminated
from r2ray.redaction import redact_text

EXIT_USER_ERROR = 2
"""Bad input or configuration; the message says what to fix. Nothing was committed."""
EXIT_NOTHING_ROUTED = 3
"""``route`` committed a run that routed no query (every row quarantined or deferred): the run is
on record, but a scheduler should alert on it."""
EXIT_INTERRUPTED = 128 + signal.SIGINT
"""Ctrl-C, as a shell reports an interrupted tool: a route leaves its committed run whole and its
interrupted attempt for the rerun to redo."""
EXIT_TERMINATED = 128 + signal.SIGTERM
"""SIGTERM (a Kubernetes pod deleted, ``ray job stop``), as a shell reports a terminated tool: the
run stops as on Ctrl-C, its lease released, so a rerun starts at once."""

PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)
"""A path the user gave that cannot be used: missing, a file where a folder must be (``--out
notes.txt/bench.parquet``) or the other way round, not permitted. The message names the path; a
traceback through the writer would not help."""

BENCH_FORMATS = ["long", "r2bench", "routerbench", "paretobandit", "routerarena"]


def _bench_parsers(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="bench data: convert, synthesise, summarise")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    convert = sub.add_parser("convert", help="convert a published bench layout to the long format")
    convert.add_argument("inputs", nargs="+", metavar="INPUT", help="files (paths or URIs)")
    convert.add_argument("--format", required=True, choices=BENCH_FORMATS)
    convert.add_argument("--out", required=True, help="output bench (.parquet or .jsonl)")
    convert.add_argument("--catalog-out", help="catalogue of the models found "
                         "(default: <out without suffix>.catalog.yaml)")
    convert.add_argument("--model", action="append", default=None,
                         help="r2bench: model name for each input file, in order "
                              "(default: taken from the file name)")
    convert.add_argument("--catalog", help="catalogue to take prices from where the source has none")
    convert.set_defaults(handler=_bench_convert)

    synth = sub.add_parser("synth", help="generate the synthetic world (seeded, streamed)")
    synth.add_argument("--queries", type=int, required=True, help="number of queries")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", help="bench, every arm of every query (.parquet or .jsonl)")
    synth.add_argument("--backlog", help="queries alone, as a routing job reads them")
    synth.add_argument("--truth", help="expected quality and output tokens per arm (oracle)")
    synth.add_argument("--embeddings", action="store_true",
                       help="add a precomputed `embedding` column to the backlog")
    synth.add_argument("--catalog", help="catalogue YAML (default: the paper's 11-model pool)")
    synth.add_argument("--chunk-queries", type=int, default=4096,
                       help="queries generated per chunk (bounds memory)")
    synth.set_defaults(handler=_bench_synth)

    stats = sub.add_parser("stats", help="per (model, budget): count, quality, tokens, compliance, cost")
    stats.add_argument("bench", nargs="+", help="bench files, directories or globs")
    stats.add_argument("--catalog", help="catalogue for prices (default: <bench without "
                       "suffix>.catalog.yaml beside the bench if present, else the default pool)")
    stats.set_defaults(handler=_bench_stats)


def _bench_convert(args: argparse.Namespace) -> None:
    from r2ray.bench.formats import convert_files

    summary = convert_files(args.format, args.inputs, out=args.out, catalog_out=args.catalog_out,
                            model_names=args.model, catalog_path=args.catalog)
    print(summary)


def _bench_synth(args: argparse.Namespace) -> None:
    from r2ray.bench.synthetic import write_world
    from r2ray.catalog import load_catalog

    if not (args.out or args.backlog or args.truth):
        raise R2RayError("nothing to write: give at least one of --out, --backlog, --truth")
    summary = write_world(load_catalog(args.catalog), n_queries=args.queries, seed=args.seed,
                          bench_uri=args.out, backlog_uri=args.backlog, truth_uri=args.truth,
                          embeddings=args.embeddings, chunk_queries=args.chunk_queries)
    print(summary)


def _bench_stats(args: argparse.Namespace) -> None:
    from r2ray.bench.stats import bench_stats_report

    print(bench_stats_report(args.bench, catalog_path=args.catalog))


def _route_parser(commands: argparse._SubParsersAction) -> None:
    route = commands.add_parser(
        "route", help="route a backlog under one global budget (the nightly batch job, on Ray)")
    route.add_argument("--input", required=True, help="backlog: parquet/jsonl file, prefix or glob")
    route.add_argument("--output", required=True, help="runs are written under OUTPUT/RUN_ID/")
    route.add_argument("--model", required=True,
                       help="models:/NAME@ALIAS, models:/NAME/VERSION or a saved-predictor folder")
    budget = route.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-usd", type=float, help="total spend limit for the run (USD)")
    budget.add_argument("--budget-per-query", dest="budget_per_query_usd", type=float,
                        help="spend limit per routed query (USD); total = this × queries")
    route.add_argument("--spend-guarantee", type=float, metavar="P",
                       help="plan so the realised bill stays within the budget with probability "
                            "P (default 0.95; sized by the model's spend simulation); 0 plans "
                            "the whole budget on predicted costs")
    route.add_argument("--strict-budget", action="store_true",
                       help="price every arm at its max_tokens cap, so the bill can never exceed "
                            "the budget (fewer or shorter answers than the predicted-cost plan)")
    route.add_argument("--no-cost-correction", dest="cost_correction", action="store_false",
                       default=None, help="ignore the per-arm cost correction of the latest "
                       "`r2ray reconcile` for this model under --output (applied by default)")
    route.add_argument("--catalog", help="catalogue YAML (default: the one the model carries)")
    route.add_argument("--run-id", help="default: run-<UTC timestamp>")
    route.add_argument("--force", action="store_true", help="redo a committed run id")
    route.add_argument("--defer", action="store_true",
                       help="if the budget cannot pay for the cheapest arms, defer queries "
                            "(quality 0, cost 0) instead of failing")
    route.add_argument("--seed", type=int, help="seed of the tie-break hash")
    route.add_argument("--tracking-uri", help="MLflow tracking URI (default: environment)")
    route.add_argument("--workers", type=int,
                       help="predictor actors (default: one per CPU of the cluster, or one per "
                            "GPU share with --gpus-per-worker)")
    route.add_argument("--cpus-per-worker", type=float,
                       help="default: (cluster CPUs - 1 per node) / workers, room for the read "
                            "tasks")
    route.add_argument("--gpus-per-worker", type=float, help="default 0")
    route.add_argument("--threads-per-worker", type=int,
                       help="torch threads in each worker (default: its CPUs rounded down, at "
                            "least 1)")
    route.add_argument("--batch-size", type=int,
                       help="rows per actor call (default: texts, parquet rows / (workers x 8) "
                            "as a power of two within 256-2,048, 256 when unknown; 8,192 "
                            "precomputed embeddings)")
    route.add_argument("--read-tasks", type=int,
                       help="read tasks running at once (default: one per 8 workers)")
    route.add_argument("--encoder-precision", choices=("auto", "float32", "bfloat16"),
                       help="the text encoder's forward pass (default auto: bfloat16 on a CPU "
                            "with AMX or AVX512-BF16 or a bf16 GPU, as Serve; float32 elsewhere)")
    route.set_defaults(handler=_route)


def _route(args: argparse.Namespace) -> None:
    from r2ray.batch.config import route_config
    from r2ray.batch import route_batch, summarise_manifest

    fields = ("input", "output", "model", "budget_usd", "budget_per_query_usd", "spend_guarantee",
              "strict_budget", "cost_correction", "catalog", "run_id", "force", "defer", "seed",
              "tracking_uri", "workers", "cpus_per_worker", "gpus_per_worker", "threads_per_worker",
              "batch_size", "read_tasks", "encoder_precision")
    config = route_config(**{name: getattr(args, name) for name in fields})
    manifest = route_batch(config)
    print(summarise_manifest(manifest))
    return EXIT_NOTHING_ROUTED if manifest["counts"]["routed"] == 0 else 0


def _evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="deferral curves, AUDC / QNC / Peak / cost ratios against every baseline")
    evaluate.add_argument("--bench", required=True, help="long-format bench (file, folder or URI)")
    evaluate.add_argument("--model", required=True,
                          help="models:/NAME@ALIAS, models:/NAME/VERSION, a saved predictor "
                               "folder, or a predictor name (its default settings)")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json and curves.png")
    evaluate.add_argument("--catalog", help="catalogue YAML (default: the model's training one, "
                          "else <bench without suffix>.catalog.yaml, else the default pool)")
    evaluate.add_argument("--seeds", type=int, help="random splits (default 5; --split "
                          "category makes one split per category instead)")
    evaluate.add_argument("--split", choices=["random", "category"], default="random",
                          help="random 80/20 per seed, or leave one category out")
    evaluate.add_argument("--queries", help="table with query_id + embedding (skips the encoder)")
    evaluate.add_argument("--methods", help="comma-separated learned methods (default: all but "
                          "the composite stacked, averaged and selected)")
    evaluate.add_argument("--train-sizes", metavar="N,N,...",
                          help="learning curves: also fit every learned method on this many "
                               "training queries per split (e.g. 250,500,1000,2000,5000)")
    evaluate.add_argument("--tracking-uri", help="MLflow tracking URI (default: environment)")
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    from r2ray.evaluation.learning_curves import parse_sizes
    from r2ray.evaluation.run import evaluate_uris

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    evaluate_uris(args.bench, args.model, args.out, catalog_path=args.catalog, seeds=args.seeds,
                  split=args.split, queries_uri=args.queries, methods=methods,
                  tracking_uri=args.tracking_uri,
                  train_sizes=parse_sizes(args.train_sizes) if args.train_sizes else None)


def _train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="fit a predictor, log it to MLflow, register a version, optionally promote")
    train.add_argument("--bench", required=True, help="long-format bench (file, folder or URI)")
    train.add_argument("--queries", help="table with query_id + embedding, e.g. a synthetic "
                       "backlog (skips the encoder)")
    train.add_argument("--catalog", help="catalogue YAML (default: <bench without "
                       "suffix>.catalog.yaml beside the bench, else the default pool)")
    train.add_argument("--split", choices=["random", "category"],
                       help="test split: random 20%% of queries (default), or leave one category "
                            "out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, help="most epochs (early stopping may end sooner)")
    train.add_argument("--register", metavar="NAME", help="registered model name (required; "
                       "with --warm-start, default: the name of the version extended)")
    train.add_argument("--promote", metavar="ALIAS", help="move ALIAS to the new version if it "
                       "beats the current holder on this run's test split")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: R2RAY_TRACKING_URI, "
                       "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    train.add_argument("--encoder", help="minilm (default for text) or a local "
                       "sentence-transformers folder; with --queries, the encoder that made them")
    train.add_argument("--select", choices=["cv", "none"],
                       help="cv (default without --predictor): choose among --candidates by "
                            "K-fold cross-validation on the training part and register the "
                            "winner; none (default with --predictor): fit --predictor alone")
    train.add_argument("--candidates",
                       help="cv candidates: a set (small, the default: per_arm_ridge, "
                            "carrot_knn_all, r2ray, "
                            "stacked, averaged; fast: no network; full: every candidate) or names, "
                            "comma-separated (r2ray.predictor.selection.CANDIDATES)")
    train.add_argument("--folds", type=int, default=3, help="cv folds, by query (default 3)")
    train.add_argument("--tune", action="store_true",
                       help="cv on Ray Tune: candidates as trials on the cluster (RAY_ADDRESS, "
                            "else a local Ray), ASHA stopping those that trail after a fold")
    train.add_argument("--tune-storage", metavar="URI",
                       help="where trials checkpoint (default: a temporary folder; give shared "
                            "storage, e.g. s3://bucket/tune, on a multi-node cluster)")
    train.add_argument("--predictor", help="registry key to fit alone (default r2ray); with "
                       "--select cv, the kind --set and --epochs apply to")
    train.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                       help="predictor setting, e.g. --set monotone=budgets (repeatable)")
    train.add_argument("--experiment", default="r2ray-train", help="MLflow experiment name")
    train.add_argument("--warm-start", metavar="MODEL_URI",
                       help="add new models to this registered predictor (models:/NAME@ALIAS, "
                            "models:/NAME/VERSION or a folder) instead of training one: --bench "
                            "holds rows of the new models, --catalog the extended catalogue; only "
                            "the new models' parameters are fitted (--set prior=P; --folds F: "
                            "their calibrations' cross-fitting)")
    train.set_defaults(handler=_train)


WARM_START_SETTINGS = ("prior",)   # and --folds: the calibrations' cross-fitting folds
NOT_WITH_WARM_START = ("select", "predictor", "epochs", "tune", "tune_storage", "encoder", "split",
                       "candidates")   # flags that default to None: given means typed


def _warm_start(args: argparse.Namespace) -> None:
    from r2ray.training import WarmStartConfig, parse_settings, warm_start_job

    given = [name for name in NOT_WITH_WARM_START if getattr(args, name)]
    if given:
        raise R2RayError(f"--warm-start fits only the new models' parameters of the registered "
                         f"predictor: drop --{given[0].replace('_', '-')}")
    if not args.catalog:
        raise R2RayError("--warm-start needs --catalog: the registered catalogue with the new "
                         "model(s) added")
    settings = parse_settings(args.settings)
    unknown = sorted(set(settings) - set(WARM_START_SETTINGS))
    if unknown:
        raise R2RayError(f"--warm-start takes --set {', '.join(WARM_START_SETTINGS)}; not "
                         f"{', '.join(unknown)}")
    config = _config(WarmStartConfig, dict(
        warm_start=args.warm_start, bench=args.bench, catalog=args.catalog,
        registered_name=args.register, queries=args.queries, seed=args.seed,
        promote=args.promote, tracking_uri=args.tracking_uri, experiment=args.experiment,
        folds=args.folds, **settings), set(settings))
    print(warm_start_job(config).report())


def _config(model, values: dict, settings: set[str] = frozenset()):
    """``model(**values)``; a bad value is a user error naming its flag (``settings``: given
    with --set), not a pydantic traceback."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        flag = (f"--set {field}" if field in settings or field == "settings" else
                "--register" if field == "registered_name" else f"--{field.replace('_', '-')}")
        raise R2RayError(f"{flag}: {first['msg']}") from None


def _train(args: argparse.Namespace) -> None:
    started = time.perf_counter()  # before the imports: torch and MLflow take seconds
    if args.warm_start:
        return _warm_start(args)
    if not args.register:
        raise R2RayError("give --register NAME: the registered model the new version goes to")
    from r2ray.training import TrainConfig, parse_settings, train_predictor_job

    fields = ("bench", "queries", "catalog", "split", "seed", "epochs", "promote",
              "tracking_uri", "encoder", "experiment", "candidates", "folds", "tune",
              "tune_storage")
    # unset flags are None (so --warm-start can tell --split and --candidates were typed):
    # TrainConfig's own defaults apply to them
    given = {name: value for name in fields if (value := getattr(args, name)) is not None}
    config = _config(TrainConfig, {**given, "registered_name": args.register,
                                   "settings": parse_settings(args.settings),
                                   "predictor": args.predictor or "r2ray",
                                   "select": args.select or ("none" if args.predictor else "cv")})
    result = train_predictor_job(config)
    print(result.report(wall_seconds=time.perf_counter() - started))


def _demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the main job end to end on the embedded default")
    demo.add_argument("--workdir", default="runs/demo", help="where everything is written")
    demo.add_argument("--queries", type=int, default=20_000, help="backlog size")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> None:
    from r2ray.demo import run_demo

    sys.stdout.reconfigure(line_buffering=True)   # each [n/4] step shows as it starts, piped too
    run_demo(workdir=args.workdir, n_queries=args.queries, seed=args.seed)


def _reconcile_parser(commands: argparse._SubParsersAction) -> None:
    reconcile = commands.add_parser(
        "reconcile", help="a committed run's planned spend and quality against realised usage; "
                          "writes a report and a per-arm cost correction")
    reconcile.add_argument("--run", required=True, metavar="RUN_URI",
                           help="the run folder, OUTPUT/RUN_ID, of a committed run")
    reconcile.add_argument("--actuals", required=True, metavar="URI",
                           help="realised usage: parquet/jsonl file, folder or glob (query_id, "
                                "model, budget, input_tokens, output_tokens, optional quality, "
                                "cost_usd)")
    reconcile.add_argument("--catalog", help="catalogue YAML the run was priced with (default: "
                           "the run's --catalog, else the one its model version carries)")
    reconcile.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run's, "
                           "else the environment)")
    reconcile.set_defaults(handler=_reconcile)


def _reconcile(args: argparse.Namespace) -> None:
    from r2ray.reconcile import reconcile_run

    result = reconcile_run(args.run, args.actuals, catalog_path=args.catalog,
                           tracking_uri=args.tracking_uri)
    print(result.summary())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2ray", description="An LLM router on Ray: for every query, which model answers it "
        "and how many output tokens it may use, under one global spend limit (USD). Exit status: "
        "0 done, 2 bad input or configuration (nothing committed), 3 a route committed but "
        "routed nothing, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.")
    commands = parser.add_subparsers(dest="command", required=True)
    _bench_parsers(commands)
    _route_parser(commands)
    _evaluate_parser(commands)
    _train_parser(commands)
    _demo_parser(commands)
    _reconcile_parser(commands)
    from r2ray.execution.cli import add_parsers as execution_parsers

    execution_parsers(commands)   # bench collect, execute
    _refuse_empty_text(parser)
    return parser


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("give a value, not an empty string")
    return value


def _refuse_empty_text(parser: argparse.ArgumentParser) -> None:
    """Every text argument of every command must be non-empty: an unset shell variable
    (``--bench "$BENCH"``) otherwise read as the current folder, or as the flag left out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _refuse_empty_text(sub)
        elif action.type is None and action.nargs != 0 and action.option_strings != ["-h"]:
            action.type = _nonempty


@contextlib.contextmanager
def _sigterm_stops_the_command():
    """SIGTERM raises :class:`Terminated` while a command runs (main thread only: the only one
    :func:`signal.signal` may be called from); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_note(err: KeyboardInterrupt) -> str:
    """What a stop adds to its line: an execution stopped by a second Ctrl-C or SIGTERM says
    its calls in flight may be billed unrecorded (``note``, :class:`~r2ray.execution.engine.
    StopOnSignal`); a first one waited for them and recorded them."""
    note = getattr(err, "note", "")
    return f" ({note})" if note else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_stops_the_command():
            return args.handler(args) or 0
    except (R2RayError, *PATH_ERRORS) as err:
        print(f"r2ray {args.command}: error: {redact_text(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated as err:   # the pod deleted: stopped as on Ctrl-C, lease released
        print(f"r2ray {args.command}: stopped by SIGTERM{_stop_note(err)}; run it again to redo it",
              file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt as err:   # Ctrl-C: the user's stop, not a bug (redone on its rerun)
        print(f"r2ray {args.command}: interrupted{_stop_note(err)}; run it again to redo it",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:   # the reader left early (`r2ray bench stats B | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's flush
        return 128 + signal.SIGPIPE   # what a shell reports for a tool its pipe's reader left


if __name__ == "__main__":
    sys.exit(main())
