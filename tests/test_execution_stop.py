"""A Ctrl-C or SIGTERM stopping an execution mid-batch: the calls in flight (sent, billed) are
waited for and recorded, so the rerun sends only what was never sent; a second stops at once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import default_sigint

from r2ray.catalog import catalog_from_dict
from r2ray.execution.client import (CUT_OFF, RUN_STOPPED, EndpointLimiter, EndpointSettings,
                                    execute_one)
from r2ray.execution.engine import _LocalBook, read_parts
from r2ray.execution.policy import RetryPolicy, SpendBook
from r2ray.execution.requests import request_row
from r2ray.execution.stub import StubServer

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from r2ray.catalog import catalog_from_dict
from r2ray.cli import _sigterm_stops_the_command
from r2ray.execution.engine import EngineConfig, run_requests
from r2ray.execution.policy import RetryPolicy
from r2ray.execution.requests import request_row, requests_table
url, work, mark, timeout_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
cat = catalog_from_dict({"budgets": ["default"], "models": [
    {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
     "endpoint": url, "max_output_tokens": 24}]})
reqs = [request_row(cat, "answer", f"q{i}", "small", 0,
                    [{"role": "user", "content": f"q{i} {mark}"}], 24) for i in range(8)]
config = EngineConfig(executor="local", batch_rows=4,
                      retry=RetryPolicy(timeout_s=timeout_s, max_retry_after_s=120))
try:
    with _sigterm_stops_the_command():
        run = run_requests(requests_table(reqs), work, cat, config, progress=lambda line: None)
    print("done", run.results.num_rows, flush=True)
except KeyboardInterrupt as err:
    print("stopped", type(err).__name__, getattr(err, "note", ""), flush=True)
"""


def _run_child(stub: StubServer, work: str, mark: str, timeout_s: float = 30.0,
               signals: tuple = ()) -> str:
    """Run the child on 8 requests (batches of 4); once 4 calls reached the stub, send each of
    ``signals``; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, stub.url, work, mark, str(timeout_s)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 60
        while signals and stub.arrived < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not signals or stub.arrived >= 4, "the first batch never reached the stub"
        for signum in signals:
            child.send_signal(signum)
            time.sleep(0.3)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    return out.strip()


def test_a_sigterm_mid_batch_records_the_calls_in_flight_and_the_rerun_sends_the_rest(tmp_path):
    # before the fix: the 4 calls in flight were sent (billed) but never recorded; the rerun sent
    # all 8 again (12 calls for 8 needed) and the folder's spend never counted the first 4
    work = str(tmp_path / "work")
    with StubServer() as stub:
        out = _run_child(stub, work, "[slow:1.5]", signals=(signal.SIGTERM,))
        assert out == "stopped Terminated", out
        parts = read_parts(work + "/parts")
        assert parts.num_rows == 4 and parts["ok"].to_pylist() == [True] * 4
        assert sum(parts["billed_usd"].to_pylist()) > 0
        assert stub.arrived == 4   # no new call once stopped
        assert _run_child(stub, work, "[slow:1.5]") == "done 8"
        assert stub.arrived == 8   # the rerun sent only the 4 never sent
        assert len(stub.answered()) == 8


def test_a_second_signal_stops_at_once_and_says_calls_may_be_billed_unrecorded(tmp_path):
    work = str(tmp_path / "work")
    with StubServer() as stub:
        out = _run_child(stub, work, "[slow:20]", signals=(signal.SIGINT, signal.SIGINT))
        assert out == ("stopped KeyboardInterrupt stopped at once: calls in flight may be billed "
                       "and not recorded"), out
        assert read_parts(work + "/parts").num_rows == 0


def test_a_call_waiting_out_a_retry_when_stopped_is_left_for_the_rerun_unbilled(tmp_path):
    # a 429 asking to wait 30 s: the stop waits the calls' timeout (2 s), not the 30 s, and the
    # requests, never answered or billed, are failures the rerun sends
    work = str(tmp_path / "work")
    with StubServer(retry_after="30") as stub:
        out = _run_child(stub, work, "[fault:429]", timeout_s=2.0, signals=(signal.SIGTERM,))
        assert out == "stopped Terminated", out
        failures = read_parts(work + "/failures")
        assert failures["error"].to_pylist() == [RUN_STOPPED] * 4
        assert failures["billed_usd"].to_pylist() == [0.0] * 4
        assert stub.arrived == 4


def test_a_call_cut_off_in_flight_is_booked_at_its_worst_case():
    # the wait for a stopped run's calls ran out with this one's request out: the provider may
    # bill it, so its worst case stays in the spend (before: no row, nothing booked)
    cat = catalog_from_dict({"budgets": ["default"], "models": [
        {"name": "small", "input_per_m": 1.0, "output_per_m": 2.0, "context": 4096,
         "endpoint": "http://127.0.0.1:9/v1", "max_output_tokens": 24}]})
    with StubServer() as stub:
        request = request_row(cat, "answer", "q", "small", 0,
                              [{"role": "user", "content": "q [slow:5]"}], 24)
        settings = EndpointSettings(url=stub.url + "/chat/completions")
        book = SpendBook()

        async def cut_off() -> dict:
            async with httpx.AsyncClient() as client:
                call = asyncio.ensure_future(execute_one(
                    client, request, settings, EndpointLimiter(settings), RetryPolicy(),
                    _LocalBook(book), random.Random(0)))
                while stub.arrived < 1:
                    await asyncio.sleep(0.02)
                call.cancel()
                return await call

        row = asyncio.run(cut_off())
    assert row["error"] == CUT_OFF and not row["ok"]
    assert row["billed_usd"] == pytest.approx(request["worst_usd"])
    assert book.state()["realised_usd"] == pytest.approx(request["worst_usd"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_cli_says_a_second_stop_may_leave_calls_billed_unrecorded(signum, tmp_path,
                                                                      monkeypatch, capsys):
    # before the fix: the line said only "interrupted; run it again", as after a first stop
    # whose calls in flight were all recorded
    import r2ray.demo
    from r2ray.cli import main
    from r2ray.execution.engine import UNRECORDED_NOTE, StopOnSignal

    def stopped_at_once(**kwargs):
        raise StopOnSignal.stop(signum, UNRECORDED_NOTE)

    monkeypatch.setattr(r2ray.demo, "run_demo", stopped_at_once)
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 128 + signum
    said = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert capsys.readouterr().err == (f"r2ray demo: {said} ({UNRECORDED_NOTE}); run it again to "
                                       "redo it\n")
