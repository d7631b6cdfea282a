"""The ``r2ray`` command's statuses for a path the user gave that cannot be used: one line and
exit 2 (a user error), not a traceback and exit 1 (a crash)."""

from __future__ import annotations

import pytest

from r2ray.cli import EXIT_USER_ERROR, main


def test_an_output_under_a_file_is_a_user_error(tmp_path, capsys):
    """``r2ray bench synth --out notes.txt/bench.parquet`` (a file where a folder must be) ended
    in a FileExistsError traceback from the writer's makedirs and exit 1."""
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "bench.parquet"
    assert main(["bench", "synth", "--queries", "5", "--out", str(out)]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.startswith("r2ray bench: error: ") and error.count("\n") == 1
    assert str(tmp_path / "notes.txt") in error


@pytest.mark.parametrize("error", [NotADirectoryError(20, "Not a directory", "/data/notes.txt/x"),
                                   IsADirectoryError(21, "Is a directory", "/data/bench"),
                                   PermissionError(13, "Permission denied", "/data/locked")])
def test_every_unusable_path_is_a_user_error(monkeypatch, capsys, error):
    """Any command: a path that is a file where a folder must be, the other way round, or not
    permitted is one line naming it and exit 2 (`r2ray evaluate --out notes.txt/eval` raised
    NotADirectoryError, with a traceback, once every split was fitted)."""
    import r2ray.bench.stats

    def unusable(*args, **kwargs):
        raise error

    monkeypatch.setattr(r2ray.bench.stats, "bench_stats_report", unusable)
    assert main(["bench", "stats", "bench.parquet"]) == EXIT_USER_ERROR
    assert capsys.readouterr().err == f"r2ray bench: error: {error}\n"
