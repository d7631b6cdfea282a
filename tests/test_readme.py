"""The README's user-facing contract as a test: the commands, flags, defaults, columns, exit
codes and run-folder names it documents are the ones the code has. Text only: no Ray, no model."""

import argparse
import re
from pathlib import Path

from r2ray import cli, manifest
from r2ray.batch import pool
from r2ray.batch.config import RouteConfig
from r2ray.execution.execute import ACTUALS_COLUMNS
from r2ray.reconcile import actuals
from r2ray.serving.config import ServeConfig

README = Path(__file__).resolve().parent.parent / "README.md"
JOBS = {"route_batch": "route", "evaluate": "evaluate", "train_predictor": "train"}
POOL_FLAGS = {"--workers": "workers", "--cpus-per-worker": "cpus_per_worker",
              "--gpus-per-worker": "gpus_per_worker", "--threads-per-worker": "threads_per_worker",
              "--batch-size": "batch_size", "--read-tasks": "read_tasks",
              "--encoder-precision": "encoder_precision"}


def readme() -> str:
    """The README with shell line continuations joined, so a command is one line, and a table
    cell's escaped ``\\|`` (``small\\|fast``) read as ``/``, so it does not end the cell."""
    return re.sub(r"\\\n\s*", " ", README.read_text()).replace("\\|", "/")


def subcommand(words: list[str]) -> argparse.ArgumentParser | None:
    """The parser of ``r2ray WORDS`` (``["bench", "stats"]``), or None if there is none."""
    parser = cli.build_parser()
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            return None
        parser = subs[0].choices[word]
    return parser


def documented_commands() -> list[tuple[str, list[str], str]]:
    """(the text shown, the subcommand's words, the rest of the line) for every ``r2ray ...``
    and ``python jobs/X.py ...`` the README shows, in tables, code blocks or prose."""
    found = []
    for match in re.finditer(r"\br2ray ((?:bench )?[a-z]+)([^|\n`]*)", readme()):
        found.append((match.group(0), match.group(1).split(), match.group(2)))
    for match in re.finditer(r"python jobs/(\w+)\.py([^|\n`]*)", readme()):
        found.append((match.group(0), [JOBS[match.group(1)]], match.group(2)))
    return found


def test_every_documented_flag_exists_on_its_command():
    commands = [(shown, words, rest) for shown, words, rest in documented_commands()
                if subcommand(words) is not None]
    assert len(commands) > 20, "the README's commands were not found"
    missing = []
    for shown, words, rest in commands:
        flags = {o for a in subcommand(words)._actions for o in a.option_strings}
        missing += [(shown[:80], flag) for flag in re.findall(r"--[a-z][a-z0-9-]*", rest)
                    if flag not in flags]
    assert not missing


def test_every_subcommand_is_in_the_command_table():
    table = {" ".join(words) for shown, words, _ in documented_commands()
             if shown.startswith("r2ray") and subcommand(words) is not None}
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in commands.choices["bench"]._actions
                 if isinstance(a, argparse._SubParsersAction))
    names = {n for n in commands.choices if n != "bench"} | {f"bench {n}" for n in bench.choices}
    assert names - table == set()


def pool_table() -> dict[str, str]:
    """The scoring pool's flag table: {flag: its default column}."""
    section = README.read_text().split("**The scoring pool.**", 1)[1].split("\n\n", 2)[1]
    return dict(re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", section, re.M))


def test_the_pool_table_lists_every_pool_flag_of_route():
    route_flags = {o for a in subcommand(["route"])._actions for o in a.option_strings}
    assert set(pool_table()) == set(POOL_FLAGS)
    assert set(POOL_FLAGS) <= route_flags
    assert set(POOL_FLAGS.values()) <= set(RouteConfig.model_fields)


def test_the_pool_table_defaults_are_the_code_defaults():
    table = pool_table()
    fields = RouteConfig.model_fields
    assert table["--gpus-per-worker"].strip() == f"{fields['gpus_per_worker'].default:g}"
    assert table["--encoder-precision"].startswith(f"`{fields['encoder_precision'].default}`")
    low, high = pool.TEXT_BATCH_LIMITS
    assert f"(workers × {pool.CALLS_PER_WORKER})" in table["--batch-size"]
    assert f"within {low:,}–{high:,} ({pool.TEXT_BATCH_ROWS:,} when unknown)" in \
        table["--batch-size"]
    assert f"{pool.EMBEDDING_BATCH_ROWS:,} precomputed embeddings" in table["--batch-size"]
    assert f"one per {pool.WORKERS_PER_READ_TASK} workers" in table["--read-tasks"]


def test_the_spend_guarantee_default_is_the_code_default():
    default = RouteConfig.model_fields["spend_guarantee"].default
    assert f"`r2ray route --spend-guarantee P` (default {default:g})" in readme()


def command_row(command: str) -> str:
    """The command table's row of ``command`` (``"r2ray execute"``)."""
    return next(line for line in README.read_text().splitlines()
                if line.startswith(f"| `{command} "))


def test_the_documented_execute_actuals_are_the_columns_it_writes():
    listed = re.search(r"\(`([a-z_, ]+)`\) \|$", command_row("r2ray execute")).group(1)
    assert listed.split(", ") == ACTUALS_COLUMNS


def test_the_documented_reconcile_actuals_are_the_columns_it_reads():
    required, optional = re.search(r"\(parquet/jsonl: `([a-z_, ]+)`, optional ([^)]+)\)",
                                   command_row("r2ray reconcile")).groups()
    assert required.split(", ") == actuals.REQUIRED
    assert re.findall(r"`([a-z_]+)`", optional) == actuals.OPTIONAL + [actuals.RUN_ID]


def test_the_exit_codes_are_the_cli_codes():
    sentence = re.search(r"Exit codes: (.*?)\. Each run", readme(), re.S).group(1)
    codes = {int(c) for c in re.findall(r"(?:^|; )(\d+) ", sentence)}
    assert codes == {0, cli.EXIT_USER_ERROR, cli.EXIT_NOTHING_ROUTED, cli.EXIT_INTERRUPTED,
                     cli.EXIT_TERMINATED}


def test_the_run_folder_names_are_the_codes():
    text = readme()
    for name in (manifest.MARKER, manifest.LOCK, manifest.MANIFEST):
        assert f"`{name}`" in text
    paths = manifest.RunPaths("<output>", "<run_id>", f"{manifest.ATTEMPT_PREFIX}<stamp>")
    partition = manifest.routed_partition("NAME").replace("NAME", "<name>")
    assert f"`{paths.routed}/{partition}/`" in text
    for folder in ("routed", "quarantine", "deferred"):
        assert f"`output.{folder}`" in text
        assert getattr(paths, folder) == f"{paths.path()}/{folder}"
    assert paths.manifest == f"{paths.root}/{manifest.MANIFEST}"
    one_folder = manifest.routed_partition("meta-llama/Llama-3.1-8B")
    assert "`meta-llama/Llama-3.1-8B` is one folder" in text and "/" not in one_folder


def test_every_serve_argument_shown_is_a_serve_config_field():
    names = set(ServeConfig.model_fields) | {"lambda"}
    shown = [key for line in re.findall(r"serve run serve\.app:app([^\n]*)", readme())
             for key in re.findall(r"\b([a-z_]+)=", line)]
    assert shown and set(shown) <= names
