"""A saved predictor as an MLflow pyfunc model: a DataFrame of queries in, q̂ / t̂ / ĉ per arm out.

Input columns: ``query`` (text, encoded with the predictor's encoder), optional ``embedding``
(a precomputed vector per row; skips the encoder for that row), optional ``input_tokens``
(tokens, a positive integer; estimated from the text when absent). Output, one row per input row: ``input_tokens``
and three list columns in ``catalog.arms`` order — ``quality`` (q̂ ∈ [0, 1]), ``output_tokens``
(t̂, tokens) and ``cost_usd`` (ĉ, USD). The arm order is in the model's metadata (``arms``, as
``model|budget``) and in :func:`arm_labels`.

The model is an :class:`R2RayPyfunc`, logged as code (MLflow "models from code") from the package
file :data:`MODEL_CODE_PATH`, so nothing is pickled; the package's wheel travels with the model
(:mod:`r2ray.wheel`). Its ``load_context`` reads the weights, tensors + JSON, from the
``predictor`` artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from r2ray.catalog import Catalog, budget_label
from r2ray.encoders import (Encoder, EncoderError, check_embedding_dimension, embed_or_encode,
                            model_encoder)
from r2ray.predictor.base import BasePredictor, PredictorError
from r2ray.prompting import estimate_tokens

PREDICTOR_ARTIFACT = "predictor"
MODEL_CODE_PATH = str(Path(__file__).with_name("pyfunc_model.py"))
"""The models-from-code file that MLflow runs to build an :class:`R2RayPyfunc`."""


def arm_labels(catalog: Catalog) -> list[str]:
    """``model|budget`` for every arm, in arm order (budget ``default`` for the default arm)."""
    return [f"{arm.model}|{budget_label(arm.budget_tokens)}" for arm in catalog.arms]


def _is_vector(value) -> bool:
    """A non-empty list/array (None, NaN and empty lists mean: no embedding for this row)."""
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0


def frame_embeddings(frame: pd.DataFrame, predictor: BasePredictor,
                     encoder: Encoder | None) -> np.ndarray:
    """[N, D] float32: the ``embedding`` column where given, else the encoded ``query``."""
    n, dim = len(frame), predictor.embedding_dim_
    given = (frame["embedding"].map(_is_vector).to_numpy(bool) if "embedding" in frame.columns
             else np.zeros(n, dtype=bool))
    embedding = np.full((n, dim), np.nan, dtype=np.float32)  # NaN rows: encode the query
    if given.any():
        rows = np.stack([np.asarray(v, dtype=np.float32) for v in frame["embedding"][given]])
        embedding[given] = check_embedding_dimension(rows, dim, "input column 'embedding'")
    if "query" not in frame.columns and not given.all():
        raise EncoderError("the input needs a 'query' column (text) or an 'embedding' column")
    texts = frame["query"].astype(str).tolist() if "query" in frame.columns else [""] * n
    return embed_or_encode(texts, embedding, encoder, dim)


def frame_input_tokens(frame: pd.DataFrame) -> np.ndarray:
    """[N] float64 input tokens: the ``input_tokens`` column, else (a missing value: None or
    NaN) estimated from ``query``. A given count that is not a positive integer is refused,
    naming its row, as the batch job and Serve refuse it: a negative one priced ĉ below zero."""
    given = (given_input_tokens(frame["input_tokens"]) if "input_tokens" in frame.columns
             else np.full(len(frame), np.nan))
    if np.isnan(given).any():
        if "query" not in frame.columns:
            raise EncoderError("give 'input_tokens' or a 'query' to estimate them from")
        estimate = frame["query"].map(lambda q: estimate_tokens(str(q))).to_numpy(float)
        given = np.where(np.isnan(given), estimate, given)
    return given


def given_input_tokens(column: pd.Series) -> np.ndarray:
    """[N] float64 counts of the ``input_tokens`` column, NaN where missing; a value that is not
    a positive integer (0, negative, fractional, infinite or not a number) is a PredictorError
    naming its row."""
    given = pd.to_numeric(column, errors="coerce").to_numpy(float)
    bad = ~column.isna().to_numpy() & ~(np.isfinite(given) & (given >= 1)
                                        & (given == np.floor(given)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PredictorError(f"input row {row}, column 'input_tokens': {column.iloc[row]} is "
                             f"not a positive integer ({int(bad.sum())} rows with one)")
    return given


def predict_frame(predictor: BasePredictor, frame: pd.DataFrame,
                  encoder: Encoder | None) -> pd.DataFrame:
    """Decode the frame, predict every arm, encode the answer as list columns (see module doc)."""
    embedding = frame_embeddings(frame, predictor, encoder)
    input_tokens = frame_input_tokens(frame)
    prediction = predictor.predict(embedding)
    cost = prediction.cost_usd(predictor.catalog_, input_tokens)
    return pd.DataFrame({
        "input_tokens": input_tokens,
        "quality": list(prediction.quality.astype(np.float64)),
        "output_tokens": list(prediction.output_tokens.astype(np.float64)),
        "cost_usd": list(cost),
    })


class R2RayPyfunc(PythonModel):
    """MLflow pyfunc wrapper; state comes from the ``predictor`` artifact in ``load_context``."""

    def load_context(self, context) -> None:
        """``model_config={"device": ...}`` (``mlflow.pyfunc.load_model``) overrides the device."""
        from r2ray.predictor.persist import load_predictor

        self.device = (context.model_config or {}).get("device")
        self.source = context.artifacts[PREDICTOR_ARTIFACT]
        self.predictor = load_predictor(self.source, device=self.device)
        self.encoder: Encoder | None = None

    def _encoder(self) -> Encoder | None:
        """The text encoder, checked (:func:`r2ray.encoders.check_encoder`) and loaded on first
        use (None for precomputed-embedding predictors)."""
        if self.encoder is None:
            self.encoder = model_encoder(self.predictor.encoder_spec,
                                         self.predictor.encoder_fingerprint,
                                         f"the predictor at {self.source}", device=self.device)
        return self.encoder

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        needs_text = ("embedding" not in frame.columns
                      or not frame["embedding"].map(_is_vector).all())
        return predict_frame(self.predictor, frame, self._encoder() if needs_text else None)
