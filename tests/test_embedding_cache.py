"""The embedding cache: a text is encoded once per encoder, whatever command asks again."""

from __future__ import annotations

import numpy as np
import pytest

from r2ray.embedding_cache import (cached_encode, embed_texts, evict_stale, folder_fingerprint,
                                   remembered_fingerprint, touch)
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



def test_a_corrupted_shard_is_never_read_as_vectors(cache, capsys):
    """One flipped bit in a shard's vector bytes (a bad disk, a bad copy) was read back as a
    wrong vector with no warning; page checksums make it an unreadable shard, encoded again."""
    rng = np.random.default_rng(0)
    vectors = {text: rng.standard_normal(8).astype(np.float32) for text in ("x", "y")}
    encode = Counting(lambda texts: np.stack([vectors[t] for t in texts]))
    cached_encode(["x", "y"], "enc", encode)
    shard = next((cache / "enc").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[data.index(vectors["y"].tobytes()) + 5] ^= 0x10   # random floats are stored verbatim
    shard.write_bytes(bytes(data))
    out, hits = cached_encode(["x", "y"], "enc", encode)
    assert hits == 0 and encode.calls[-1] == ["x", "y"]
    assert "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(out, np.stack([vectors["x"], vectors["y"]]))


def test_a_shard_another_process_evicts_meanwhile_is_no_warning(cache, monkeypatch, capsys):
    """Two processes share the cache: a shard listed, then evicted by the other before it is
    read, was reported as "unreadable" (FileNotFoundError), a fault that is none."""
    import pyarrow.parquet as pq

    encode = Counting(fake_encode)
    cached_encode(["x"], "enc", encode)
    read_table = pq.read_table

    def evicted_first(shard, **options):
        shard.unlink()   # the other process's eviction, between the listing and the read
        return read_table(shard, **options)

    monkeypatch.setattr(pq, "read_table", evicted_first)
    out, hits = cached_encode(["x"], "enc", encode)
    assert hits == 0 and encode.calls[-1] == ["x"]
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(out, fake_encode(["x"]))

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


def test_a_folder_fingerprint_never_changes(tmp_path):
    """Saved predictors record it (:func:`r2ray.encoders.check_encoder` compares): the same files
    must give the same 16 characters in every release."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / "vocab.txt").write_text("x")
    assert folder_fingerprint(str(tmp_path)) == "55c8afe7c89230ac"


def test_one_file_is_fingerprinted_by_contents_wherever_it_is_installed(tmp_path, monkeypatch):
    """The local LLM's GGUF is one file: every install of its bytes (another venv, a touch) gets
    one key, remembered so the next start reads a memo, not 98 MB."""

    cache = tmp_path / "cache"
    installs = []
    for venv in ("venv1", "venv2"):
        (tmp_path / venv).mkdir()
        installs.append(tmp_path / venv / "model.gguf")
        installs[-1].write_bytes(b"GGUF weights")
    first = remembered_fingerprint(installs[0], cache)
    assert first == remembered_fingerprint(installs[1], cache) == folder_fingerprint(
        str(installs[1])) and len(list(cache.iterdir())) == 2        # one memo per install
    with monkeypatch.context() as patch:
        patch.setattr("r2ray.embedding_cache.folder_fingerprint",
                      lambda path: pytest.fail("hashed the file again"))
        assert remembered_fingerprint(installs[0], cache) == first
    installs[1].write_bytes(b"GGUF other weights")
    assert remembered_fingerprint(installs[1], cache) != first
    assert remembered_fingerprint(installs[0], None) == first          # no cache: hashed


def test_a_new_copy_evicts_the_least_recently_used_copies_of_its_source(tmp_path):
    """Keep the 2 most recently used copies of a source (a use touches it); never a copy of
    another source, one another process is still writing, or anything outside the cache."""
    import os
    import time


    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"not the cache's")
    now = time.time()

    def entry(name: str, age_s: float, folder: bool = True):
        path = cache / name
        if folder:
            path.mkdir()
            (path / "config.json").write_text("{}")
        else:
            path.write_bytes(b"copy")
        os.utime(path, (now - age_s, now - age_s))
        return path

    used, older, oldest = (entry(f"smol-{digit * 16}", age)
                           for digit, age in (("1", 300), ("2", 200), ("3", 100)))
    old_file = entry(f"smol-{'4' * 16}", 400, folder=False)
    link = cache / f"smol-{'5' * 16}"
    link.symlink_to(outside, target_is_directory=True)
    os.utime(link, (now - 50, now - 50), follow_symlinks=False)
    spared = [entry(f"smol-{'6' * 16}.123.partial", 900),        # another process is writing it
              entry(f"smol-{'7' * 16}.tmp-123-ab", 900, folder=False),
              entry(f"gemma-{'8' * 16}", 900)]                     # another source
    kept = entry(f"smol-{'9' * 16}", 0)
    touch(used)                                                   # read just now
    removed = evict_stale(kept, r"smol-[0-9a-f]{16}")
    assert sorted(removed) == sorted([older, oldest, old_file, link])
    assert sorted(cache.iterdir()) == sorted([kept, used, *spared])
    assert (outside / "weights.bin").read_bytes() == b"not the cache's"   # the link went, not this
    assert evict_stale(kept, r"smol-[0-9a-f]{16}") == []


def test_the_cache_is_bounded_least_recently_used_shards_go_first(cache, monkeypatch):
    """Shards of every encoder count against R2RAY_EMBEDDING_CACHE_MAX_GB; over it, the least
    recently used go (a hit touches its shard); the shard just written, and a shard another
    process is still writing, stay. Before, nothing was ever removed."""
    import os
    import time

    def shards():
        return sorted(cache.glob("*/*.parquet"))

    cached_encode(["old bench"], "a" * 16, fake_encode)          # an encoder since upgraded
    cached_encode(["used bench"], "b" * 16, fake_encode)
    cached_encode(["unused bench"], "b" * 16, fake_encode)
    (cache / ("b" * 16) / ".another-process.tmp").write_bytes(b"half a shard")
    one_shard = max(path.stat().st_size for path in shards())
    hour_ago = time.time() - 3600
    for path in shards():
        os.utime(path, (hour_ago, hour_ago))
    cached_encode(["used bench"], "b" * 16, fake_encode)          # a hit: its shard is used now
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE_MAX_GB", str(2.5 * one_shard / 1e9))
    encode = Counting(fake_encode)
    cached_encode(["new bench"], "c" * 16, encode)
    assert len(shards()) == 2 and (cache / ("b" * 16) / ".another-process.tmp").exists()
    assert cached_encode(["used bench"], "b" * 16, encode)[1] == 1    # kept: no encode
    assert cached_encode(["new bench"], "c" * 16, encode)[1] == 1
    assert encode.calls == [["new bench"]]
    assert cached_encode(["old bench"], "a" * 16, encode)[1] == 0     # evicted: encoded again
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE_MAX_GB", "0")       # the shard just written stays
    cached_encode(["another"], "c" * 16, fake_encode)
    assert [path.parent.name for path in shards()] == ["c" * 16]


@pytest.mark.parametrize("bound", ["lots", "-1", "nan", "inf"])
def test_a_bad_cache_bound_is_an_error_naming_the_variable(cache, monkeypatch, bound):
    from r2ray.errors import R2RayError

    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE_MAX_GB", bound)
    with pytest.raises(R2RayError, match=f"R2RAY_EMBEDDING_CACHE_MAX_GB='{bound}'"):
        cached_encode(["a text"], "a" * 16, fake_encode)


def test_a_cache_over_a_lowered_bound_shrinks_on_a_read_that_writes_nothing(cache, monkeypatch):
    """The bound was met only after a write: a cache over a bound lowered since (or filled by an
    older r2ray) stayed over it while every read was a hit (review C). A hit's shard was just
    used: it is the one that stays."""
    import os
    import time

    cached_encode(["this bench"], "b" * 16, fake_encode)
    cached_encode(["old bench"], "a" * 16, fake_encode)
    cached_encode(["other bench"], "a" * 16, fake_encode)
    shards = sorted(cache.glob("*/*.parquet"))
    this_one = next(cache.glob(("b" * 16) + "/*.parquet"))
    for age, path in enumerate([this_one, *(p for p in shards if p != this_one)]):
        os.utime(path, (time.time() - 3600 * (3 - age),) * 2)   # this bench's: the oldest
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE_MAX_GB",
                       str(1.5 * max(path.stat().st_size for path in shards) / 1e9))
    encode = Counting(fake_encode)
    assert cached_encode(["this bench"], "b" * 16, encode)[1] == 1 and encode.calls == []
    assert sorted(cache.glob("*/*.parquet")) == [this_one]


def test_vectors_of_another_precision_are_never_served(cache, tmp_path):
    """The cache was keyed by the encoder's files alone: a bfloat16 encoder's vectors (MiniLM:
    up to 1.8e-3 off float32's) were served to a float32 encoder of the same folder (review Z)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    class Encoder:   # what embed_texts reads of r2ray.encoders.Encoder
        name, device = str(folder), "cpu"

        def __init__(self, precision, shift):
            self.precision, self.shift = precision, shift

        def encode(self, texts):
            return fake_encode(texts) + self.shift

    texts = ["what is 2 + 2?", "a haiku about rays"]
    fast = embed_texts(Encoder("bfloat16", 0.5), texts)
    np.testing.assert_array_equal(embed_texts(Encoder("float32", 0.0), texts), fake_encode(texts))
    np.testing.assert_array_equal(embed_texts(Encoder("bfloat16", 9.0), texts), fast)   # cached
    assert sorted(path.name for path in cache.iterdir()) == [                 # float32's stay
        remembered_fingerprint(folder, None), remembered_fingerprint(folder, None) + "-bfloat16"]


def test_the_bound_removes_only_the_caches_own_shards(cache, monkeypatch):
    """Any ``*.parquet`` one folder down counted as a shard: a cache pointed at a data folder
    deleted the bench files in it once over its bound (review Z)."""
    cached_encode(["old bench"], "a" * 16, fake_encode)
    (cache / "bench").mkdir()
    (cache / "bench" / "queries.parquet").write_bytes(b"a bench's own table")
    monkeypatch.setenv("R2RAY_EMBEDDING_CACHE_MAX_GB", "0")
    cached_encode(["new bench"], "a" * 16, fake_encode)
    assert (cache / "bench" / "queries.parquet").read_bytes() == b"a bench's own table"
    assert len(list((cache / ("a" * 16)).glob("*.parquet"))) == 1   # the old shard went


def test_a_shard_that_cannot_be_written_leaves_nothing_behind(cache, monkeypatch, capsys):
    """A failed write (a full disk, a rename refused) left its half-written ``.tmp`` shard in the
    cache for good: never read, never counted against the bound, never removed (review Z)."""
    import os

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", disk_full)
        patch.setattr(os, "replace", disk_full)
        out, hits = cached_encode(["a text"], "a" * 16, fake_encode)
    np.testing.assert_array_equal(out, fake_encode(["a text"]))
    assert "No space left on device" in capsys.readouterr().err
    assert list((cache / ("a" * 16)).iterdir()) == []
