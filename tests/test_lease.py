"""One run of a run id at a time (review D, 2026-12-06): the run folder's lease. Two runs of one run
id at once used to undo each other; here a second is refused, a dead run's lease is taken over,
and the lease is released however the run ends. The job's stages are stubbed (``_route_attempt``):
everything here happens before Ray would start."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import default_sigint

from r2ray import manifest as runs
from r2ray import storage
from r2ray.batch import job, route_batch
from r2ray.batch.config import route_config
from r2ray.bench.io import write_table
from r2ray.cli import main
from r2ray.errors import R2RayError


@pytest.fixture
def night(tmp_path, small_routing_model):
    """A route config for run id ``night`` over a three-query backlog."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.jsonl").write_text("".join(
        json.dumps({"query_id": f"q{i}", "query": f"question {i}", "embedding": [0.1] * 16}) + "\n"
        for i in range(3)))
    return route_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                        model=small_routing_model["path"], budget_usd=1.0, run_id="night")


def _lock_path(config) -> str:
    return os.path.join(config.output, "night", "_r2ray_lock.json")


def _lock(config) -> dict | None:
    path = _lock_path(config)
    return json.loads(storage.read_text(path)) if os.path.exists(path) else None


def test_a_second_run_of_a_running_run_id_is_refused_and_touches_nothing(night, monkeypatch):
    # before the fix: the second run cleared the first's attempt as an interrupted one's (and
    # the first's cleanup would then remove the second's marker)
    seen = {}

    def first_run(config, attempt, *rest):   # run A at work; run B of the same id starts
        part = attempt.path("routed", "model=m", "part-0.parquet")
        write_table(pa.table({"query_id": ["a"]}), part)
        marker = storage.read_text(attempt.marker)
        monkeypatch.setattr(job, "_route_attempt", lambda *args: {"second": "ran"})
        try:
            seen["second"] = route_batch(night)
        except R2RayError as err:
            seen["second"] = str(err)
        assert os.path.exists(part), "the second run removed the first's attempt"
        assert pq.read_table(part).num_rows == 1 and storage.read_text(attempt.marker) == marker
        return {"first": "committed"}

    monkeypatch.setattr(job, "_route_attempt", first_run)
    assert route_batch(night) == {"first": "committed"}
    refusal = seen["second"]
    assert isinstance(refusal, str), refusal
    assert "run night is already running" in refusal and f"(pid {os.getpid()})" in refusal
    assert "_r2ray_lock.json until 20" in refusal   # the owner's expiry, in UTC
    assert _lock(night) is None   # released at the end


def test_a_live_lease_refuses_the_cli_in_one_line(night, capsys):
    # the lease is taken before the marker is written: a folder holding only it is r2ray's
    from r2ray.lease import acquire_lease

    lease = acquire_lease(runs.RunPaths(night.output, "night"))
    try:
        args = ["route", "--input", night.input, "--output", night.output, "--model",
                night.model, "--budget-usd", "1", "--run-id", "night"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run night is already running" in err
        assert f"owner {lease.owner} " in err and "not an r2ray run folder" not in err
    finally:
        lease.release()
    assert not os.path.exists(os.path.join(night.output, "night"))


def test_a_dead_runs_lease_is_taken_over_and_the_run_redone(night, monkeypatch):
    paths = runs.RunPaths(night.output, "night")
    crashed, _ = runs.start_attempt(paths, fingerprint="f")   # a night that died mid-run
    storage.write_text(_lock_path(night), json.dumps({
        "run_id": "night", "owner": "dead", "host": "elsewhere", "pid": 1,
        "expires_at": "2026-01-01T00:00:00+00:00"}))
    seen = {}

    def rerun(config, attempt, state, *rest):
        seen.update(state=state, lock=_lock(night))
        return {}

    monkeypatch.setattr(job, "_route_attempt", rerun)
    route_batch(night)
    assert seen["state"] == "redo" and not os.path.exists(crashed.path())
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["owner"] != "dead"
    assert _lock(night) is None


@pytest.mark.parametrize("failure", [R2RayError("a clean refusal"), RuntimeError("a crash")])
def test_the_lease_is_released_after_a_failure(night, monkeypatch, failure):
    seen = {}

    def failing_run(config, attempt, *rest):
        seen.update(lock=_lock(night), attempt=attempt.path())
        write_table(pa.table({"query_id": ["a"]}), attempt.path("routed", "part-0.parquet"))
        raise failure

    monkeypatch.setattr(job, "_route_attempt", failing_run)
    with pytest.raises(type(failure)):
        route_batch(night)
    assert seen["lock"]["pid"] == os.getpid()   # held while the run worked
    assert _lock(night) is None
    if isinstance(failure, R2RayError):   # a clean refusal leaves nothing at all
        assert not os.path.exists(os.path.join(night.output, "night"))
    else:   # a crash leaves its attempt for the rerun to clear
        assert os.path.exists(seen["attempt"])
    monkeypatch.setattr(job, "_route_attempt", lambda *args: {"again": True})
    assert route_batch(night) == {"again": True}   # the next run is not refused


def test_a_run_that_lost_its_lease_leaves_the_new_holders_marker(night, monkeypatch):
    # its lease expired unrenewed and another run took it over: a refusal now must not abandon
    # (abandon removes the marker of a folder it made: the new holder's)
    from r2ray.lease import LeaseLost

    def overtaken(config, attempt, state, *rest):
        _take_over(night)
        with pytest.raises(LeaseLost, match="lost its lease"):
            rest[-1].renew()   # what the job does just before its commit
        raise R2RayError("this run gives up")

    monkeypatch.setattr(job, "_route_attempt", overtaken)
    with pytest.raises(R2RayError, match="gives up"):
        route_batch(night)
    assert _lock(night)["owner"] == "next"   # the new holder's lease is not removed either
    assert os.path.exists(runs.RunPaths(night.output, "night").marker)


def _take_over(config) -> None:
    """What another run does to the lease of one that went unrenewed: its own lock, live."""
    storage.write_text(_lock_path(config), json.dumps({
        "run_id": "night", "owner": "next", "host": "elsewhere", "pid": 1,
        "expires_at": "2999-01-01T00:00:00+00:00"}))


def test_a_run_that_lost_its_lease_removes_its_own_attempt(night, monkeypatch):
    # the new holder clears attempts when it starts and commits: one written after (this run
    # stalled, then finished its work) was left beside its committed run for good
    def overtaken(config, attempt, state, *rest):
        write_table(pa.table({"query_id": ["q0"]}), os.path.join(attempt.routed, "part-0.parquet"))
        _take_over(night)
        rest[-1].renew()   # LeaseLost, as at the commit

    monkeypatch.setattr(job, "_route_attempt", overtaken)
    with pytest.raises(R2RayError, match="lost its lease"):
        route_batch(night)
    root = os.path.join(night.output, "night")
    assert not [n for n in os.listdir(root) if n.startswith(runs.ATTEMPT_PREFIX)]
    assert os.path.exists(runs.RunPaths(night.output, "night").marker)   # the new holder's
    assert _lock(night)["owner"] == "next"


def test_a_run_that_lost_its_lease_reports_nothing(night, monkeypatch):
    # checked only before the commit, it logged an MLflow run (and wrote report.md) for a night
    # another run now routes: two MLflow runs of one run id, one of them never committed
    import threading

    from r2ray.batch import report
    from r2ray.batch.report import STATS_SCHEMA, combine_stats
    from r2ray.lease import LeaseLost, acquire_lease

    paths = runs.RunPaths(night.output, "night")
    lease = acquire_lease(paths)
    attempt, _ = runs.start_attempt(paths, fingerprint="f")
    reported = []
    monkeypatch.setattr(report, "write_report", lambda *args: reported.append("report.md") or {})
    monkeypatch.setattr(job, "_log_report", lambda *args: reported.append("mlflow"))
    warm = threading.Thread(target=lambda: None)
    warm.start()
    _take_over(night)
    stats = combine_stats(pa.Table.from_pylist([], schema=STATS_SCHEMA))
    try:
        with pytest.raises(LeaseLost, match="lost its lease"):
            job._report_and_commit(night, attempt, {"run_id": "night"}, stats, warm, {}, lease)
    finally:
        lease.release()
    assert reported == [] and not runs.is_committed(paths)


def test_a_run_takes_the_lease_of_a_folder_another_run_empties_meanwhile(tmp_path, monkeypatch):
    # a run that failed before writing anything removes its emptied run folder as it releases
    # its lease; the run taking the lease at that moment (the folder made, the lock's temporary
    # file not yet written) failed "cannot write to the output …: No such file or directory"
    from r2ray.lease import acquire_lease

    paths = runs.RunPaths(str(tmp_path), "night")
    name = storage.temporary_path

    def released_meanwhile(path):
        if os.path.isdir(paths.root) and not os.listdir(paths.root):
            os.rmdir(paths.root)   # the other run's release, once
            monkeypatch.setattr(storage, "temporary_path", name)
        return name(path)

    monkeypatch.setattr(storage, "temporary_path", released_meanwhile)
    lease = acquire_lease(paths)
    assert _lock(paths)["owner"] == lease.owner
    lease.release()


@pytest.mark.parametrize("meanwhile", ["entered", "removed"])
def test_a_release_leaves_the_run_folder_to_the_next_run(meanwhile, night, monkeypatch, capsys):
    # its lock removed, the release lists the run folder to remove it if empty; meanwhile the
    # next run's lease lands in it ("Directory not empty"), or the next run's own release removes
    # it ("No such file or directory"): the release warned "could not release the lease" though
    # it had
    from fsspec.implementations.local import LocalFileSystem

    from r2ray.lease import acquire_lease

    paths = runs.RunPaths(night.output, "night")
    lease = acquire_lease(paths)
    listing = LocalFileSystem.ls

    def next_run_meanwhile(fs, path, detail=True, **kwargs):
        if path.rstrip("/") == paths.root and meanwhile == "removed":
            os.rmdir(paths.root)
        found = listing(fs, path, detail=detail, **kwargs)
        if path.rstrip("/") == paths.root and meanwhile == "entered":
            _take_over(night)
        return found

    monkeypatch.setattr(LocalFileSystem, "ls", next_run_meanwhile)
    lease.release()
    assert "warning" not in capsys.readouterr().err
    assert os.path.isdir(paths.root) == (meanwhile == "entered")


def test_a_run_checking_the_folder_while_its_holder_renews_is_told_it_is_running(night,
                                                                                 monkeypatch):
    # a renewal holds a claim on the lock (and writes a temporary file) for milliseconds; a run
    # checking the folder then, while the holder still loads its model (no marker yet), was told
    # the folder was not r2ray's: "move its contents away", a live run's lease
    from r2ray.lease import RunLocked, acquire_lease

    lease = acquire_lease(runs.RunPaths(night.output, "night"))
    write = storage.write_bytes

    def second_run_meanwhile(uri, data):   # the lock's rewrite, under its claim
        monkeypatch.setattr(storage, "write_bytes", write)
        with pytest.raises(RunLocked, match="already running"):
            route_batch(night)
        write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", second_run_meanwhile)
    try:
        lease.renew()
    finally:
        lease.release()


def test_a_lock_that_is_no_lease_is_named(night, monkeypatch):
    paths = runs.RunPaths(night.output, "night")
    runs.start_attempt(paths, fingerprint="f")
    storage.write_text(_lock_path(night), "not json")
    monkeypatch.setattr(job, "_route_attempt", lambda *args: {"ran": True})
    with pytest.raises(R2RayError, match="_r2ray_lock.json is no lease r2ray can read"):
        route_batch(night)
    assert storage.read_text(_lock_path(night)) == "not json"


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_a_lease_is_held_by_one_run_at_a_time(where, tmp_path, request):
    # memory:// takes the object-store path (fs.open "xb"); s3 checks the server honours it
    from r2ray.lease import RunLocked, acquire_lease

    root = {"local": str(tmp_path), "memory": f"memory://review-d/{tmp_path.name}",
            "s3": request.getfixturevalue("s3_bucket") if where == "s3" else None}[where]
    paths = runs.RunPaths(storage.join(root, "runs"), "night")
    first = acquire_lease(paths)
    storage.write_text(paths.lock, json.dumps(   # as if its run had stalled: the lease expired
        first.record() | {"expires_at": "2000-01-01T00:00:00+00:00"}))
    first.renew()   # what its thread does every RENEW_EVERY_S: live again, for LEASE_S
    with pytest.raises(RunLocked, match=f"owner {first.owner} "):
        acquire_lease(paths)
    assert first.holds()
    first.release()
    assert not storage.exists(paths.lock)
    second = acquire_lease(paths)
    assert second.holds() and not first.holds()
    second.release()
    assert not storage.exists(paths.lock)


def test_of_runs_starting_at_the_same_instant_one_takes_the_lease(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from r2ray.lease import RunLocked, acquire_lease

    paths, start = runs.RunPaths(str(tmp_path / "runs"), "night"), Barrier(8)

    def start_a_run(_):
        start.wait()
        try:
            return acquire_lease(paths)
        except RunLocked:
            return None

    with ThreadPoolExecutor(8) as pool:
        leases = [lease for lease in pool.map(start_a_run, range(8)) if lease is not None]
    assert len(leases) == 1 and leases[0].holds()
    leases[0].release()


def _store(where, tmp_path, request) -> str:
    """A folder on the local disk, in fsspec's memory store (the object-store path, ``"xb"``) or
    in the test S3 bucket."""
    return {"local": str(tmp_path), "memory": f"memory://review-d-takeover/{tmp_path.name}",
            "s3": request.getfixturevalue("s3_bucket") if where == "s3" else None}[where]


def _take_over_after_the_next_read(monkeypatch, paths) -> list:
    """The next read of the lock returns what it read only after another run has taken the
    lease over (the list then holds that run's lease): a deterministic race."""
    from r2ray import lease as leases

    read_lease, taken = leases.read_lease, []

    def read_then_another_run_takes_over(read_paths):
        held = read_lease(read_paths)
        monkeypatch.setattr(leases, "read_lease", read_lease)
        taken.append(leases.acquire_lease(paths))
        return held

    monkeypatch.setattr(leases, "read_lease", read_then_another_run_takes_over)
    return taken


def _dead_lease(paths) -> None:
    storage.write_text(paths.lock, json.dumps({
        "run_id": "night", "owner": "dead", "host": "elsewhere", "pid": 1,
        "expires_at": "2000-01-01T00:00:00+00:00"}))


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_of_two_runs_taking_over_one_dead_lease_one_is_refused(where, tmp_path, request,
                                                                monkeypatch):
    # before the fix: B read the dead lease, A took it over, then B removed A's fresh lock as the
    # dead one it had read and created its own: both runs held the lease
    from r2ray.lease import RunLocked, acquire_lease

    paths = runs.RunPaths(storage.join(_store(where, tmp_path, request), "runs"), "night")
    _dead_lease(paths)
    taken = _take_over_after_the_next_read(monkeypatch, paths)
    try:
        second = acquire_lease(paths)   # B: its first read of the dead lock lets A take it over
    except RunLocked as refusal:
        second, refused = None, str(refusal)
    first = taken[0]
    both = [lease for lease in (first, second) if lease is not None and lease.holds()]
    assert runs.children(paths.root) == ["_r2ray_lock.json"]   # no claim is left behind
    for lease in (first, second):
        if lease is not None:
            lease.release()
    assert second is None, "B took over the lease A had just taken over"
    assert f"owner {first.owner} " in refused and both == [first]
    assert not storage.exists(paths.lock)


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
@pytest.mark.parametrize("step", ["renew", "release"])
def test_a_stalled_run_leaves_the_lease_another_run_took_over(step, where, tmp_path, request,
                                                                monkeypatch):
    # before the fix: a run whose lease had expired read it as its own, another run took it over,
    # and the stalled run's renewal then overwrote the new lease (its release removed it)
    from r2ray.lease import LeaseLost, acquire_lease

    paths = runs.RunPaths(storage.join(_store(where, tmp_path, request), "runs"), "night")
    stalled = acquire_lease(paths)
    storage.write_text(paths.lock, json.dumps(   # it went unrenewed for LEASE_S
        stalled.record() | {"expires_at": "2000-01-01T00:00:00+00:00"}))
    taken = _take_over_after_the_next_read(monkeypatch, paths)
    if step == "renew":
        with pytest.raises(LeaseLost, match="lost its lease"):
            stalled.renew()
    stalled.release()
    new = taken[0]
    assert new.holds() and not stalled.holds()
    new.release()
    assert not storage.exists(paths.lock)


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
@pytest.mark.parametrize("claim_expires", ["2000-01-01T00:00:00+00:00", "2999-01-01T00:00:00+00:00"])
def test_a_claim_left_by_a_run_that_died_holding_it_expires(claim_expires, where, tmp_path,
                                                             request, capsys):
    # before: a run killed in the milliseconds it held a claim left it, and every later run of
    # the run id was refused until someone removed the claim by hand
    from r2ray.lease import RunLocked, acquire_lease, claim_path, read_lease

    paths = runs.RunPaths(storage.join(_store(where, tmp_path, request), "runs"), "night")
    _dead_lease(paths)
    claim = claim_path(paths, read_lease(paths))
    storage.write_text(claim, json.dumps({"owner": "dead", "expires_at": claim_expires}))
    if claim_expires.startswith("2999"):   # a live claim: another run is changing the lock
        with pytest.raises(RunLocked, match="takeover-"):
            acquire_lease(paths)
        assert storage.exists(claim) and read_lease(paths)["owner"] == "dead"
        return
    lease = acquire_lease(paths)
    assert lease.holds() and "a run that died holding it left it" in capsys.readouterr().err
    assert runs.children(paths.root) == ["_r2ray_lock.json"]   # the dead claim is gone
    lease.release()
    assert not storage.exists(paths.lock)


@pytest.mark.parametrize("where", ["local", "memory", "s3"])
def test_of_two_runs_passing_one_dead_claim_one_changes_the_lock(where, tmp_path, request,
                                                                 monkeypatch):
    # before the fix: B read the dead claim as expired, A removed it and made its own, then B
    # removed A's live claim as the dead one and made its own: both changed the lock (review C)
    import threading

    from r2ray import lease as leases

    paths = runs.RunPaths(storage.join(_store(where, tmp_path, request), "runs"), "night")
    _dead_lease(paths)
    seen = leases.read_lease(paths)
    claim = leases.claim_path(paths, seen)
    storage.write_text(claim, json.dumps({"owner": "dead",
                                          "expires_at": "2000-01-01T00:00:00+00:00"}))
    a_changing, b_done, changed = threading.Event(), threading.Event(), []
    read_text = storage.read_text

    def b_reads_the_dead_claim_then_waits_for_a(uri):
        text = read_text(uri)
        if threading.current_thread().name == "B" and uri == claim and not a_changing.is_set():
            threading.Thread(target=run, args=("A",), name="A").start()
            assert a_changing.wait(30), "A never reached its change"
        return text

    def change(name):
        changed.append(name)
        if name == "A":   # A changes the lock only once B has gone as far as it can
            a_changing.set()
            assert b_done.wait(30), "B never finished"

    def run(name):
        try:
            leases._change_if_still(paths, seen, lambda: change(name))
        finally:
            if name == "B":
                b_done.set()

    monkeypatch.setattr(storage, "read_text", b_reads_the_dead_claim_then_waits_for_a)
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    b.join(60)
    for thread in threading.enumerate():
        if thread.name == "A":
            thread.join(60)
    assert changed == ["A"], f"{changed}: both runs changed the lock read as {seen['owner']}"
    assert runs.children(paths.root) == ["_r2ray_lock.json"]   # no claim is left behind


_STOPPED_ROUTE = """
import os, sys, time
from r2ray.batch import job
from r2ray.cli import main

def stopped_here(*args):   # the attempt at work (after Ray started, where asked) when the signal comes
    if os.environ.get("START_RAY"):
        job._init_ray()
    print("at work", flush=True)
    time.sleep(120)

job._route_attempt = stopped_here
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stop, status, start_ray", [
    (signal.SIGINT, 130, False), (signal.SIGTERM, 143, False), (signal.SIGTERM, 143, True)],
    ids=["ctrl-c", "sigterm", "sigterm-after-ray-started"])
def test_a_stopped_run_releases_its_lease_and_says_so(night, tmp_path, stop, status, start_ray):
    """Ctrl-C and SIGTERM (Kubernetes deleting the pod) stop a run alike: the lease is released,
    so a rerun starts at once, and the one line says what to do. SIGTERM used to end the process
    on the spot (status -15, nothing said, the lease left to refuse the rerun for five minutes),
    and once Ray had started, Ray's handler exited with status 15."""
    script = tmp_path / "route.py"
    script.write_text(_STOPPED_ROUTE)
    env = dict(os.environ, RAY_ADDRESS="local", START_RAY="1" if start_ray else "")
    child = subprocess.Popen(
        [sys.executable, str(script), "route", "--input", night.input, "--output", night.output,
         "--model", night.model, "--budget-usd", "1", "--run-id", "night"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=default_sigint)
    try:
        assert child.stdout.readline() == "at work\n"
        child.send_signal(stop)
        _, err = child.communicate(timeout=90)
    finally:
        child.kill()
    assert child.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "r2ray route: interrupted; run it again to redo it" if stop == signal.SIGINT
        else "r2ray route: stopped by SIGTERM; run it again to redo it")
    assert _lock(night) is None
    assert not (pathlib.Path(night.output) / "night" / "manifest.json").exists()


def test_a_run_stopped_after_its_manifest_is_written_keeps_its_mlflow_run(night, monkeypatch):
    """SIGTERM (or any error) while the commit removes the attempts it supersedes comes after the
    manifest is written: the run is committed, and its MLflow run must not be marked FAILED and
    tagged not committed (it was, for a night whose routed output consumers do read)."""
    import threading

    from r2ray.batch import report
    from r2ray.batch.report import STATS_SCHEMA, combine_stats
    from r2ray.errors import Terminated
    from r2ray.lease import acquire_lease

    paths = runs.RunPaths(night.output, "night")
    lease = acquire_lease(paths)
    attempt, _ = runs.start_attempt(paths, fingerprint="f")
    marked = []
    monkeypatch.setattr(report, "write_report", lambda *args: {})
    monkeypatch.setattr(job, "_log_report", lambda *args: "mlflow-run-1")
    monkeypatch.setattr(job, "_mark_uncommitted", lambda *args: marked.append(args[0]))

    def stopped(*args, **kwargs):
        raise Terminated("stopped by SIGTERM")

    monkeypatch.setattr(runs, "remove_attempts", stopped)
    warm = threading.Thread(target=lambda: None)
    warm.start()
    stats = combine_stats(pa.Table.from_pylist([], schema=STATS_SCHEMA))
    try:
        with pytest.raises(Terminated):
            job._report_and_commit(night, attempt, {"run_id": "night"}, stats, warm, {}, lease)
    finally:
        lease.release()
    assert runs.is_committed(paths) and marked == []
