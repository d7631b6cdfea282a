"""A deterministic, fault-injecting OpenAI-compatible server on 127.0.0.1, for tests and demos.

The last user message steers it: ``[say:TEXT]`` answers TEXT (else ``ok``), one word a token;
``[fault:KIND]`` injects a failure — on the first attempt of that request for ``429`` (with
``Retry-After``), ``500``, ``timeout`` (sleeps past the client's timeout), ``badjson`` and
``billedbad`` (a 200 with the answer's ``usage`` but no choices: billed, unusable) and
``billednocounts`` (the same with a ``usage`` block holding no counts) and ``surrogate`` (an answer
ending in a lone ``\\ud83d`` escape, half an emoji: text UTF-8 cannot carry); on every attempt for
``always500``, ``alwaysbilledbad``, ``400``, ``redirect`` (a 301 to the same path on https://) and
``204`` (no content) and ``alwayssurrogate`` (as ``surrogate``: a model that answers so every
time) and ``alwaysnull`` (a choice whose ``content`` is null, billed: a content filter, or a
reasoning model that spent ``max_tokens`` thinking); ``nousage`` answers without ``usage``.
``[slow:S]`` sleeps S seconds before answering; ``[drip:S]`` sends the body a byte every S
seconds (each gap under a per-read timeout, the whole past it). A judge prompt
(:mod:`..graders`) is answered ``Score: 1`` when the answer holds the reference, ``Score: 0``
when not, ``Score: 0.5`` without one. Every request is logged in ``calls`` once answered, and
counted in ``arrived`` as it comes (a test can stop a run while calls are in flight).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_MARK = re.compile(r"\[(say|fault|slow|drip):([^\]]*)\]")


def _drip_s(body: dict) -> float:
    """Seconds between the body's bytes (``[drip:S]``), 0 to send it whole."""
    content = str((body.get("messages") or [{}])[-1].get("content", ""))
    return float(dict(_MARK.findall(content)).get("drip") or 0)


def _judge_score(prompt: str) -> str:
    reference = re.search(r"Reference answer:\n(.*?)\n\nAnswer to grade", prompt, re.DOTALL)
    answer = re.search(r"Answer to grade:\n(.*?)\n\nScore:", prompt, re.DOTALL)
    if reference is None or answer is None:
        return "Score: 0.5"
    return "Score: 1" if reference.group(1).strip() in answer.group(1) else "Score: 0"


class StubServer:
    """``with StubServer() as stub: stub.url`` → ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, retry_after: str = "0.3", timeout_sleep_s: float = 2.0):
        self.retry_after, self.timeout_sleep_s = retry_after, timeout_sleep_s
        self.calls: list[dict] = []      # {model, content, max_tokens, status}
        self.arrived = 0                 # requests received, answered or not yet
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answered(self) -> list[dict]:
        with self._lock:
            return [c for c in self.calls if c["status"] == 200]

    def _reply(self, body: dict) -> tuple[int, dict, bytes, float]:
        """(status, headers, body, sleep before answering) for one request."""
        messages = body.get("messages") or [{}]
        content = str(messages[-1].get("content", ""))
        marks = dict(_MARK.findall(content))
        key = json.dumps([body.get("model"), content, body.get("max_tokens")])
        with self._lock:
            attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        fault, sleep = marks.get("fault"), float(marks.get("slow", 0) or 0)
        first = attempt == 1
        if fault == "400" or fault == "always500" or (first and fault in ("429", "500")):
            status = {"400": 400, "always500": 500, "429": 429, "500": 500}[fault]
            headers = {"Retry-After": self.retry_after} if status == 429 else {}
            return status, headers, json.dumps({"error": {"message": f"injected {fault}"}})\
                .encode(), sleep
        if fault == "redirect":
            return 301, {"Location": self.url.replace("http://", "https://", 1)
                         + "/chat/completions"}, b"", sleep
        if fault == "204":
            return 204, {}, b"", sleep
        if first and fault == "timeout":
            sleep += self.timeout_sleep_s
        if first and fault == "badjson":
            return 200, {}, b'{"choices": [', sleep
        words = (marks.get("say") or "ok").split()
        if "You are grading" in str(messages[0].get("content", "")):
            words = [_judge_score(content)]
        cap = int(body.get("max_tokens") or len(words))
        finish = "length" if len(words) > cap else "stop"
        words = words[:cap]
        prompt_tokens = sum(math.ceil(len(str(m.get("content", "")).encode()) / 4) + 4
                            for m in messages)
        answer = {"id": f"stub-{attempt}", "object": "chat.completion", "model": body.get("model"),
                  "choices": [{"index": 0, "finish_reason": finish,
                               "message": {"role": "assistant", "content": " ".join(words)}}]}
        if fault != "nousage":
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                               "total_tokens": prompt_tokens + len(words)}
        if fault == "alwaysbilledbad" or (first and fault == "billedbad"):
            answer["choices"] = []
        if first and fault == "billednocounts":   # billed, unusable, and no counts to price it
            answer["choices"], answer["usage"] = [], {"total_tokens": -1}
        if fault == "alwayssurrogate" or (first and fault == "surrogate"):
            # json.dumps writes the lone half as "\ud83d"
            answer["choices"][0]["message"]["content"] += " \ud83d"
        if fault == "alwaysnull":
            answer["choices"][0]["message"]["content"] = None
        return 200, {}, json.dumps(answer).encode(), sleep

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:   # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    body = {}
                with stub._lock:
                    stub.arrived += 1
                status, headers, data, sleep = stub._reply(body)
                if sleep:
                    time.sleep(sleep)
                with stub._lock:
                    stub.calls.append({"model": body.get("model"), "status": status,
                                       "authorization": self.headers.get("Authorization"),
                                       "max_tokens": body.get("max_tokens"),
                                       "content": str((body.get("messages") or [{}])[-1]
                                                      .get("content", ""))})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    drip = _drip_s(body)
                    step = 1 if drip else max(1, len(data))
                    for start in range(0, len(data), step):
                        self.wfile.write(data[start:start + step])
                        if drip:
                            self.wfile.flush()
                            time.sleep(drip)
                except (BrokenPipeError, ConnectionResetError):   # the client timed out
                    pass

        return Handler
