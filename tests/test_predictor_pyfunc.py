"""The pyfunc decode/encode path without MLflow: text or precomputed rows in, q̂ / t̂ / ĉ lists out."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from predictor_world import model_folder, planted_arrays, small_catalog

from r2ray.encoders import EncoderError
from r2ray.predictor import make_predictor
from r2ray.predictor.base import PredictorError
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


@pytest.mark.parametrize("dtype", [object, None])   # None: the column's own (int64, float64)
@pytest.mark.parametrize("bad", [-100, 0, 2.5, np.inf, "many"])
def test_an_input_token_count_that_is_not_a_positive_integer_is_refused_naming_its_row(predictor,
                                                                                        bad, dtype):
    """-100 input tokens priced every arm below zero (ĉ < 0 USD), and "many" was estimated from
    the text instead, silently; the batch job and Serve refuse both. The value is named as the
    caller wrote it (-100, not np.int64(-100) as an int64 column's repr had it)."""
    frame = pd.DataFrame({"query": ["a", "b"], "input_tokens": pd.Series([5, bad], dtype=dtype),
                          "embedding": [[0.0] * 16] * 2})
    named = re.escape(f"input row 1, column 'input_tokens': {bad} is not a positive integer")
    with pytest.raises(PredictorError, match=named):
        predict_frame(predictor, frame, None)


def test_arm_labels_follow_arm_order():
    assert arm_labels(small_catalog())[:4] == ["model-0|20", "model-0|100", "model-0|400",
                                               "model-0|default"]


@pytest.fixture()
def retrained_encoder(predictor, tmp_path):
    """The folder of a predictor saved with an encoder folder whose weights then changed."""
    from r2ray.predictor.persist import save_predictor

    spec = model_folder(tmp_path / "encoder", b"weights v1")
    saved = save_predictor(predictor, str(tmp_path / "saved"), encoder_spec=spec)
    model_folder(tmp_path / "encoder", b"weights v2, retrained in place")
    return saved


def test_every_load_that_embeds_text_refuses_an_encoder_with_other_weights(retrained_encoder,
                                                                           tmp_path):
    """The encoder was recorded by name only: Serve, the batch job, the pyfunc model and
    `r2ray evaluate` embedded queries with whatever weights were there, silently."""
    from types import SimpleNamespace

    from predictor_world import planted_bench_table

    from r2ray.batch.job import load_model
    from r2ray.bench.io import write_table
    from r2ray.catalog import save_catalog
    from r2ray.evaluation.run import evaluate_uris
    from r2ray.predictor.pyfunc import R2RayPyfunc
    from r2ray.serving.router import load_routing_model

    saved = retrained_encoder
    trained, here = "fingerprint [0-9a-f]{16}", "has fingerprint [0-9a-f]{16}"
    refused = f"{saved} was trained on embeddings of encoder .*{trained}.*{here}"
    with pytest.raises(EncoderError, match=refused):
        load_routing_model(saved, device="cpu")
    with pytest.raises(EncoderError, match=refused):
        load_model(saved, None, None)
    model = R2RayPyfunc()
    model.load_context(SimpleNamespace(model_config=None, artifacts={"predictor": saved}))
    with pytest.raises(EncoderError, match=f"{trained}.*{here}"):
        model.predict(None, pd.DataFrame({"query": ["hi"], "input_tokens": [3]}))
    bench, _ = planted_bench_table(small_catalog(), n_queries=20, dim=16, seed=0)
    write_table(bench, str(tmp_path / "bench.parquet"))
    save_catalog(small_catalog(), str(tmp_path / "bench.catalog.yaml"))
    with pytest.raises(EncoderError, match=refused):
        evaluate_uris(str(tmp_path / "bench.parquet"), saved, str(tmp_path / "eval"))


def test_a_predictor_saved_before_fingerprints_loads_with_a_warning(retrained_encoder,
                                                                    monkeypatch):
    import json

    from r2ray.serving.router import load_routing_model

    saved = retrained_encoder
    document = json.loads((Path(saved) / "predictor.json").read_text())
    del document["encoder_fingerprint"]
    del document["document_sha256"]   # saved before it too
    (Path(saved) / "predictor.json").write_text(json.dumps(document))
    monkeypatch.setattr("r2ray.encoders.load_encoder", lambda spec, **_: FakeEncoder())
    with pytest.warns(UserWarning, match="records no document_sha256"), \
            pytest.warns(UserWarning, match=f"{saved} records no fingerprint"):
        model = load_routing_model(saved, device="cpu")
    assert isinstance(model.encoder, FakeEncoder)
