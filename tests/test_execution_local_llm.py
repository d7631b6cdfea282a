"""The local OpenAI-compatible server's HTTP side, on a fake backend (no weights needed), and
its cache of converted models."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from r2ray.execution import local_llm
from r2ray.execution.local_llm import build_app, converted_folder


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


def gguf(folder: Path, weights: bytes) -> str:
    """A stand-in GGUF file in an install folder: enough to key a converted copy, not to load."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smol.Q4_1.gguf").write_bytes(weights)
    return str(folder / "smol.Q4_1.gguf")


def test_the_converted_copy_is_keyed_by_the_gguf_contents_not_its_install(tmp_path, monkeypatch):
    """Every install of the same GGUF (a new venv or clone: another path and modification time)
    shares one 540 MB converted copy; other bytes get another."""
    monkeypatch.setenv("R2RAY_LOCAL_LLM_CACHE", str(tmp_path / "cache"))
    first = converted_folder(gguf(tmp_path / "venv1", b"GGUF weights"))
    reinstalled = gguf(tmp_path / "venv2", b"GGUF weights")
    os.utime(reinstalled, (0, 0))
    assert first == converted_folder(reinstalled) and first.parent == tmp_path / "cache"
    assert first.name.startswith("smol.Q4_1-")
    assert converted_folder(gguf(tmp_path / "venv2", b"GGUF other weights")) != first
    with pytest.raises(FileNotFoundError):
        converted_folder(str(tmp_path / "none.gguf"))
    monkeypatch.setenv("R2RAY_LOCAL_LLM_CACHE", "off")
    assert converted_folder(reinstalled) is None


def test_the_converted_copy_is_keyed_by_the_transformers_version_too(tmp_path, monkeypatch):
    """The copy is one transformers version's conversion, saved in its format: another version
    (an upgrade or a downgrade) converts again rather than reading it."""
    import importlib.metadata

    monkeypatch.setenv("R2RAY_LOCAL_LLM_CACHE", str(tmp_path / "cache"))
    model = gguf(tmp_path / "venv", b"GGUF weights")
    installed = converted_folder(model)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.57.0"
                        if name == "transformers" else real(name))
    upgraded = converted_folder(model)
    assert upgraded != installed and upgraded.parent == installed.parent
    assert re.fullmatch(local_llm.older_copies(upgraded), installed.name)   # the stale copy


class Saving:
    """A tokenizer or model whose ``save_pretrained`` writes one small file."""

    def __init__(self, name: str):
        self.name, self.config = name, SimpleNamespace(quantization_config=None)

    def save_pretrained(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{self.name}.json").write_text("{}")


def test_a_new_copy_removes_the_stale_copies_of_its_gguf_and_a_load_touches_its_copy(
        tmp_path, monkeypatch):
    """Beyond the 2 most recently used (a load touches its copy), older copies of the GGUF go,
    with the bare-key names from before content keys; another GGUF's copy, a copy another process
    is still writing (``.partial``) and the memos stay."""
    monkeypatch.setenv("R2RAY_LOCAL_LLM_CACHE", str(tmp_path / "cache"))
    model = gguf(tmp_path / "venv", b"GGUF weights")
    folder = converted_folder(model)
    now = time.time()

    def copy(name: str, age_s: float) -> Path:
        path = folder.with_name(name)
        Saving("config").save_pretrained(path)
        os.utime(path, (now - age_s, now - age_s))
        return path

    used = copy(f"smol.Q4_1-{'0' * 16}", 300)
    stale = [copy(f"smol.Q4_1-{'1' * 16}", 100), copy("2" * 16, 200)]   # the last: named before
    others = [copy(f"gemma-{'3' * 16}", 900), copy(f"smol.Q4_1-{'4' * 16}.123.partial", 900),
              *folder.parent.glob("*.fingerprint")]
    monkeypatch.setattr(local_llm, "_load_pretrained", lambda path, **source: (None, None))
    monkeypatch.setattr(local_llm, "converted_folder", lambda path: used)
    local_llm.TransformersChat(model).load()
    assert used.stat().st_mtime > now - 300                       # touched: used, kept longest
    local_llm._save_converted(Saving("tokenizer"), Saving("model"), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "tokenizer.json"]
    assert used.exists() and all(p.exists() for p in others) and len(others) == 3
    assert not any(p.exists() for p in stale)
