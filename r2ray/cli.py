"""The ``r2ray`` command: argument parsing only; every command calls one library function.

Errors a user can fix (:class:`r2ray.errors.R2RayError`, missing files) print one clear line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from r2ray.errors import R2RayError

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
    stats.add_argument("--catalog", help="catalogue for prices (default: <bench>.catalog.yaml "
                       "beside the bench if present, else the default pool)")
    stats.set_defaults(handler=_bench_stats)


def _bench_convert(args: argparse.Namespace) -> None:
    from r2ray.bench.adapters import convert_files

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


def _demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the main job end to end on the embedded default")
    demo.add_argument("--workdir", default="runs/demo", help="where everything is written")
    demo.add_argument("--queries", type=int, default=20_000, help="backlog size")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> None:
    from r2ray.demo import run_demo

    run_demo(workdir=args.workdir, n_queries=args.queries, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _bench_parsers(commands)
    _demo_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (R2RayError, FileNotFoundError) as err:
        print(f"r2ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
