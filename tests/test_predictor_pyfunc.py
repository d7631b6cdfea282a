"""The pyfunc decode/encode path without MLflow: text or precomputed rows in, q̂ / t̂ / ĉ lists out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from predictor_world import planted_arrays, small_catalog

from r2ray.encoders import EncoderError
from r2ray.predictor import make_predictor
from r2ray.predictor.pyfunc import arm_labels, predict_frame
from r2ray.prompting import estimate_tokens


class FakeEncoder:
    """Deterministic 16-dimensional vectors from the text length (stands in for MiniLM here)."""

    name = "fake"

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.full(16, len(t) / 10.0, np.float32) for t in texts])


@pytest.fixture(scope="module")
def predictor():
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=100, dim=16, seed=0)
    return make_predictor("per_arm_ridge").fit(train, catalog)


def test_mixed_rows_use_their_embedding_or_the_encoder(predictor):
    given = np.linspace(-1, 1, 16).astype(np.float32)
    frame = pd.DataFrame({"query": ["short", "a longer question"],
                          "embedding": [given.tolist(), None],
                          "input_tokens": [7, np.nan]})
    out = predict_frame(predictor, frame, FakeEncoder())
    assert list(out.columns) == ["input_tokens", "quality", "output_tokens", "cost_usd"]
    expected = predictor.predict(np.stack([given, FakeEncoder().encode(["a longer question"])[0]]))
    np.testing.assert_allclose(np.stack(out["quality"]), expected.quality, rtol=1e-6)
    np.testing.assert_allclose(np.stack(out["output_tokens"]), expected.output_tokens, rtol=1e-6)
    tokens_in = [7.0, float(estimate_tokens("a longer question"))]
    assert out["input_tokens"].tolist() == tokens_in
    np.testing.assert_allclose(np.stack(out["cost_usd"]),
                               expected.cost_usd(predictor.catalog_, np.array(tokens_in)))


def test_text_without_an_encoder_or_a_wrong_vector_is_a_clear_error(predictor):
    with pytest.raises(EncoderError, match="pass an 'embedding' of 16 floats"):
        predict_frame(predictor, pd.DataFrame({"query": ["hi"]}), None)
    with pytest.raises(EncoderError, match="input column 'embedding'.*dimension 3"):
        predict_frame(predictor, pd.DataFrame({"embedding": [[0.0, 1.0, 2.0]],
                                               "input_tokens": [5]}), None)
    with pytest.raises(EncoderError, match="'query' column"):
        predict_frame(predictor, pd.DataFrame({"input_tokens": [5]}), FakeEncoder())


def test_arm_labels_follow_arm_order():
    assert arm_labels(small_catalog())[:4] == ["model-0|20", "model-0|100", "model-0|400",
                                               "model-0|default"]
