"""Encoders: the bundled MiniLM loads offline and encodes in batches; wrong dimensions fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from r2ray.encoders import (MINILM, EncoderError, check_embedding_dimension, encoder_path,
                            load_encoder)


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(MINILM, device="cpu", batch_size=2)


def test_minilm_loads_offline_and_encodes_unit_vectors(minilm):
    texts = ["What is 2 + 2?", "Write a sonnet about the sea.", "Fix this segfault in C.",
             "What is 2 + 2?", "Translate 'cat' to French."]
    vectors = minilm.encode(texts)
    assert minilm.name == MINILM and minilm.dimension == 384
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(vectors[0], vectors[3], atol=1e-5)  # same text, same vector
    assert vectors[0] @ vectors[1] < 0.9                               # different texts differ
    # batching (2 a batch here) does not change a text's vector
    np.testing.assert_allclose(minilm.encode([texts[2]])[0], vectors[2], atol=1e-4)
    assert minilm.encode([]).shape == (0, 384)


def test_any_local_sentence_transformers_folder_loads(minilm):
    by_path = load_encoder(str(encoder_path(MINILM)), device="cpu")
    assert by_path.dimension == 384
    np.testing.assert_allclose(by_path.encode(["hello"]), minilm.encode(["hello"]), atol=1e-5)


def test_a_folder_that_is_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="not a sentence-transformers model folder.*minilm"):
        load_encoder(str(tmp_path))


def test_wrong_embedding_dimension_names_expected_got_and_where():
    with pytest.raises(EncoderError) as caught:
        check_embedding_dimension(np.zeros((3, 16), np.float32), 384, "backlog.parquet")
    message = str(caught.value)
    assert "backlog.parquet" in message and "16" in message and "384" in message


def test_non_finite_embedding_names_the_row():
    embedding = np.zeros((3, 4), np.float32)
    embedding[2, 1] = np.nan
    with pytest.raises(EncoderError, match="row 3"):
        check_embedding_dimension(embedding, 4, "input")
    assert check_embedding_dimension(np.zeros((2, 4)), 4, "input").dtype == np.float32
