"""The local OpenAI-compatible server's HTTP side, on a fake backend (no weights needed)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from r2ray.execution.local_llm import build_app


class EchoChat:
    def complete(self, model: str, messages: list[dict], max_tokens: int) -> dict:
        words = messages[-1]["content"].split()[:max_tokens]
        return {"object": "chat.completion", "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": len(words),
                          "total_tokens": 3 + len(words)}}


def test_chat_completions_and_validation():
    client = TestClient(build_app(EchoChat()))
    answer = client.post("/v1/chat/completions", json={
        "model": "any-name", "max_tokens": 2,
        "messages": [{"role": "user", "content": "one two three"}]}).json()
    assert answer["model"] == "any-name"
    assert answer["choices"][0]["message"]["content"] == "one two"
    assert client.post("/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 422
    assert client.get("/v1/models").status_code == 200
