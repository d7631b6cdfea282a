"""The embedding cache: a text is encoded once per encoder, whatever command asks again."""

from __future__ import annotations

import numpy as np
import pytest

from r2ray.embedding_cache import cached_encode, embed_texts, folder_fingerprint
from r2ray.encoders import load_encoder


class Counting:
    """Wraps an encode function; records the texts each call was given."""

    def __init__(self, encode):
        self.encode, self.calls = encode, []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return self.encode(texts)


def fake_encode(texts):
    return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], np.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_each_distinct_text_is_encoded_once(cache):
    encode = Counting(fake_encode)
    texts = ["a", "bb", "a", "ccc\u00a0nbsp"]
    first, hits = cached_encode(texts, "enc1", encode)
    assert hits == 0 and encode.calls == [["a", "bb", "ccc\u00a0nbsp"]]   # "a" once
    np.testing.assert_array_equal(first, fake_encode(texts))
    again, hits = cached_encode(["bb", "new", "a"], "enc1", encode)
    assert hits == 2 and encode.calls[-1] == ["new"]
    np.testing.assert_array_equal(again, fake_encode(["bb", "new", "a"]))
    # another encoder fingerprint shares nothing
    cached_encode(["a"], "enc2", encode)
    assert encode.calls[-1] == ["a"]
    assert len(list((cache / "enc1").glob("*.parquet"))) == 2


def test_a_bad_shard_is_skipped_and_the_texts_encoded_again(cache, capsys):
    encode = Counting(fake_encode)
    cached_encode(["x", "y"], "enc", encode)
    (cache / "enc" / "broken.parquet").write_bytes(b"not parquet")
    out, hits = cached_encode(["x", "z"], "enc", encode)
    assert hits == 1 and encode.calls[-1] == ["z"]
    assert "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(out, fake_encode(["x", "z"]))


def test_off_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE", "off")
    encode = Counting(fake_encode)
    cached_encode(["x"], "enc", encode)
    cached_encode(["x"], "enc", encode)
    assert encode.calls == [["x"], ["x"]]


def test_minilm_through_the_cache_matches_the_encoder(cache, capsys):
    encoder = load_encoder("minilm", device="cpu")
    texts = [f"what is {i} plus {i}?" for i in range(20)]
    direct = encoder.encode(texts)
    first = embed_texts(encoder, texts[:12])
    second = embed_texts(encoder, texts)
    np.testing.assert_allclose(first, direct[:12], atol=1e-5)
    np.testing.assert_allclose(second, direct, atol=1e-5)
    err = capsys.readouterr().err
    assert "12 of 20 queries already embedded" in err and "8/8 queries" in err


def test_the_fingerprint_is_of_the_model_files(tmp_path):
    for name, weight in (("a", b"\x00\x01"), ("b", b"\x00\x01"), ("c", b"\x00\x02")):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "sub" / "weights.bin").write_bytes(weight)
    a, b, c = (folder_fingerprint(str(tmp_path / n)) for n in "abc")
    assert a == b != c       # same files anywhere: one cache; one weight byte changed: another
