"""Storage helpers on the local disk and on a real S3 server (SeaweedFS on 127.0.0.1)."""

import datetime as dt
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2ray import storage
from r2ray.bench.io import TableWriter, read_table, write_table


@pytest.mark.parametrize("where", ["local", "file", "s3"])
def test_round_trip_and_listing(where, tmp_path, request):
    if where == "s3":
        root = request.getfixturevalue("s3_bucket")
    else:
        root = ("file://" if where == "file" else "") + str(tmp_path)
    table = pa.table({"query_id": ["a", "b"], "value": [1.5, 2.5]})
    write_table(table, storage.join(root, "data", "part-0.parquet"))
    write_table(table, storage.join(root, "data", "part-1.jsonl"))
    storage.write_text(storage.join(root, "data", "_SUCCESS"), "")
    files = storage.list_files(storage.join(root, "data"), (".parquet", ".jsonl"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-0.parquet", "part-1.jsonl"]
    for uri in files:
        assert read_table(uri).to_pylist() == table.to_pylist()
    storage.write_text(storage.join(root, "note.txt"), "héllo")
    assert storage.read_text(storage.join(root, "note.txt")) == "héllo"


def test_missing_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.list_files(str(tmp_path / "nowhere"), (".parquet",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files ending in .parquet"):
        storage.list_files(str(tmp_path / "empty"), (".parquet",))


def test_a_file_of_another_suffix_beside_the_data_is_skipped_with_a_warning(tmp_path, caplog):
    """A .csv beside the .parquet parts of a backlog or a bill folder is not read; that was said
    nowhere (its rows were simply not routed, or its money not reconciled). Hidden and ``_``
    names (``_SUCCESS``) stay quiet."""
    write_table(pa.table({"query_id": ["a"]}), str(tmp_path / "part-0.parquet"))
    (tmp_path / "bill.csv").write_text("query_id\na\n")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".part-0.parquet.crc").write_text("")
    with caplog.at_level(logging.WARNING, logger="r2ray.storage"):
        files = storage.list_files(str(tmp_path), (".parquet",))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-0.parquet"]
    assert "1 file(s) not ending in .parquet skipped: bill.csv" in caplog.text
    assert "_SUCCESS" not in caplog.text and ".crc" not in caplog.text


def test_local_write_is_atomic_rename(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    storage.write_text(str(target), "{}")
    assert target.read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_failed_local_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        storage.write_text(str(target), "new")
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert target.read_text() == "old"


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_failed_stream_leaves_no_file_at_the_final_name(where, suffix, tmp_path, request):
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    out = storage.join(root, "out", "bench" + suffix)
    with pytest.raises(RuntimeError):
        with TableWriter(out, pa.schema([("a", pa.int64())])) as writer:
            writer.write(pa.table({"a": [1, 2]}))
            raise RuntimeError("the producer failed half-way")
    # before the fix: a valid 2-row file at the final name, indistinguishable from a complete one
    assert not storage.exists(out)
    if where == "local":
        assert os.listdir(tmp_path / "out") == []
    write_table(pa.table({"a": [3]}), out)   # the same name written whole afterwards
    assert read_table(out).to_pylist() == [{"a": 3}]


def test_a_successful_stream_is_complete_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "bench.parquet"
    with TableWriter(str(out), pa.schema([("a", pa.int64())])) as writer:
        writer.write(pa.table({"a": [1, 2]}))
    assert pq.read_table(out).num_rows == 2 and os.listdir(tmp_path) == ["bench.parquet"]


@pytest.mark.parametrize("writer", ["write_text", "TableWriter"])
def test_a_local_file_is_on_disk_before_its_name_appears(writer, tmp_path, monkeypatch):
    """A manifest or a routed part renamed into place before its bytes reach the disk can be
    empty after a power loss while the name is there (the commit names a part with no rows):
    the file is fsynced before the rename and its folder after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "run" / ("manifest.json" if writer == "write_text" else "part-0.parquet")
    if writer == "write_text":
        storage.write_text(str(target), "{}")
    else:
        with TableWriter(str(target), pa.schema([("a", pa.int64())])) as out:
            out.write(pa.table({"a": [1]}))
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert ".tmp-" in events[0][1] and events[1][1] == str(target)
    assert events[2][1] == str(target.parent)


def test_files_under_underscore_or_hidden_folders_are_not_input(tmp_path):
    table = pa.table({"query_id": ["a"], "query": ["q"]})
    (tmp_path / "_temporary" / "0").mkdir(parents=True)   # Spark/Hadoop in-progress output
    (tmp_path / ".staging").mkdir()
    pq.write_table(table, tmp_path / "part-0.parquet")
    pq.write_table(table, tmp_path / "_temporary" / "0" / "part-0.parquet")
    pq.write_table(table, tmp_path / ".staging" / "part-0.parquet")
    found = storage.list_files(str(tmp_path), (".parquet",))
    assert found == [str(tmp_path / "part-0.parquet")]   # before the fix: all three
    # a glob too: a wildcard that matches a skipped folder below its fixed part does not read it
    assert storage.list_files(str(tmp_path / "**" / "*.parquet"), (".parquet",)) == [
        str(tmp_path / "part-0.parquet")]   # before the fix: _temporary/0/part-0.parquet too
    with pytest.raises(FileNotFoundError, match="holds no files"):   # only skipped ones match
        storage.list_files(str(tmp_path / "*" / "0" / "*.parquet"), (".parquet",))
    # a folder named in the fixed part is the caller's choice, underscore or not
    assert storage.list_files(str(tmp_path / "_temporary" / "*" / "*.parquet"), (".parquet",)) \
        == [str(tmp_path / "_temporary" / "0" / "part-0.parquet")]


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_a_name_with_glob_characters_is_removed_by_that_name(where, request):
    # before the fix: rm read runs[1] as a glob: it removed runs1/'s file and kept its own
    root = request.getfixturevalue("s3_bucket") if where == "s3" else f"memory://{request.node.name}"
    root = root.replace("[", "(").replace("]", ")")   # the test's own id holds brackets
    for folder in ("runs1", "runs[1]"):
        storage.write_text(storage.join(root, folder, "r", "_r2ray_run.json"), "{}")
        storage.write_text(storage.join(root, folder, "r", "attempt-1", "part-0.parquet"), "x")
    storage.remove(storage.join(root, "runs[1]", "r", "_r2ray_run.json"))
    storage.remove(storage.join(root, "runs[1]", "r", "attempt-1"))
    assert storage.exists(storage.join(root, "runs1", "r", "_r2ray_run.json"))
    assert storage.exists(storage.join(root, "runs1", "r", "attempt-1", "part-0.parquet"))
    assert not storage.exists(storage.join(root, "runs[1]", "r", "_r2ray_run.json"))
    assert not storage.exists(storage.join(root, "runs[1]", "r", "attempt-1", "part-0.parquet"))


def test_s3_sees_what_another_host_wrote_after_this_process_listed(s3_bucket, s3_server):
    """One s3fs filesystem serves the whole process, and its listings cache answered a folder
    listed once from memory ever after: a manifest another host committed read as missing, one it
    rewrote as expired (FileExpired), and a lease it took as absent, so a second run was refused
    as "changed hands" instead of by its holder's name."""
    import s3fs

    from r2ray.lease import RunLocked, acquire_lease
    from r2ray.manifest import RunPaths, check_output, children, is_committed, read_manifest

    other_host = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server},
                                   skip_instance_cache=True)
    paths = RunPaths(storage.join(s3_bucket, "out"), "night")
    other_host.pipe(storage.filesystem(paths.marker)[1], b"{}")
    check_output(paths, [])   # lists the run folder, as a batch run does first
    assert not is_committed(paths)
    other_host.pipe(storage.filesystem(paths.manifest)[1], b'{"attempt": "a1"}')
    assert is_committed(paths) and children(paths.root) == ["_r2ray_run.json", "manifest.json"]
    assert read_manifest(paths) == {"attempt": "a1"}
    other_host.pipe(storage.filesystem(paths.manifest)[1], b'{"attempt": "a2-forced"}')
    assert read_manifest(paths) == {"attempt": "a2-forced"}   # before: FileExpired
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()
    other_host.pipe(storage.filesystem(paths.lock)[1],   # another host's run takes the lease
                    json.dumps({"owner": "run-on-host-b", "expires_at": later}).encode())
    with pytest.raises(RunLocked, match="already running: owner run-on-host-b"):
        acquire_lease(paths)   # before: "changed hands", the lock read as absent
