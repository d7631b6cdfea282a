"""Encoders: the bundled MiniLM loads offline and encodes in batches; wrong dimensions fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
from predictor_world import model_folder

from r2ray.encoders import (MINILM, EncoderError, check_embedding_dimension, embed_or_encode,
                            encoder_path, has_text_encoder, load_encoder)


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


def test_an_encoder_with_other_weights_is_refused_naming_the_model_and_both_fingerprints(
        tmp_path, monkeypatch):
    """A predictor recorded its encoder by name only: other weights under the same name (another
    package version, a folder retrained in place) ran it on other embeddings, silently."""
    import warnings

    from r2ray.encoders import EncoderFingerprintWarning, check_encoder, encoder_fingerprint

    spec = model_folder(tmp_path / "encoder", b"weights v1")
    trained = encoder_fingerprint(spec)
    assert trained == encoder_fingerprint(str(tmp_path / "encoder" / "."))   # the folder's files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_encoder(spec, trained, "models:/r2ray/3")          # the same files: no word
        check_encoder("precomputed", None, "models:/r2ray/3")    # no encoder: nothing to check
    model_folder(tmp_path / "encoder", b"weights v2, retrained")
    here = encoder_fingerprint(spec)
    assert here != trained
    with pytest.raises(EncoderError, match=f"models:/r2ray/3 was trained on embeddings of encoder "
                                           f".*fingerprint {trained}.*has fingerprint {here}"):
        check_encoder(spec, trained, "models:/r2ray/3")
    with pytest.warns(EncoderFingerprintWarning, match="models:/r2ray/1 records no fingerprint"):
        check_encoder(spec, None, "models:/r2ray/1")             # saved before: a warning only


def test_the_encoder_fingerprint_is_remembered_by_the_files_names_sizes_and_times(
        tmp_path, monkeypatch):
    """Hashing MiniLM's 91 MB at every worker's start cost 0.1 s; a memo answers later loads."""
    from r2ray.embedding_cache import folder_fingerprint
    from r2ray.encoders import encoder_fingerprint

    spec = model_folder(tmp_path / "encoder", b"weights")
    monkeypatch.setenv("R2RAY_ENCODER_CACHE", str(tmp_path / "cache"))
    first = encoder_fingerprint(spec)
    assert first == folder_fingerprint(spec) and len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setattr("r2ray.embedding_cache.folder_fingerprint",
                        lambda folder: pytest.fail("hashed the files again"))
    assert encoder_fingerprint(spec) == first
    monkeypatch.setenv("R2RAY_ENCODER_CACHE", "off")                 # no memo: the files hashed
    with pytest.raises(pytest.fail.Exception, match="hashed the files again"):
        encoder_fingerprint(spec)


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


def test_only_minilm_or_a_folder_can_embed_text():
    assert has_text_encoder(MINILM) and has_text_encoder("/models/qwen3-embedding")
    assert not any(map(has_text_encoder, [None, "", "precomputed", "synthetic", "world"]))


class CountingEncoder:
    """3-dimensional vectors from the text length; records what it was asked to encode."""

    name = "counting"

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[len(t), 0.0, 1.0] for t in texts], dtype=np.float32)


def test_embed_or_encode_keeps_given_rows_and_encodes_nan_rows_in_one_call():
    given = np.array([[1, 2, 3], [np.nan] * 3, [4, 5, 6], [np.nan] * 3], dtype=np.float32)
    encoder = CountingEncoder()
    out = embed_or_encode(["a", "bb", "ccc", "dddd"], given, encoder, 3)
    np.testing.assert_array_equal(out, [[1, 2, 3], [2, 0, 1], [4, 5, 6], [4, 0, 1]])
    assert out.dtype == np.float32 and encoder.calls == [["bb", "dddd"]]
    np.testing.assert_array_equal(embed_or_encode(["a", "bb"], None, encoder, 3)[:, 0], [1, 2])
    all_given = embed_or_encode(["a"], given[:1], None, 3)  # no encoder needed
    np.testing.assert_array_equal(all_given, given[:1])
    assert embed_or_encode([], None, None, 3).shape == (0, 3)


def test_embed_or_encode_errors_say_what_is_missing():
    with pytest.raises(EncoderError, match="1 of 2 queries have no embedding.*pass an 'embedding' "
                                           "of 3 floats"):
        embed_or_encode(["a", "b"], np.array([[1, 2, 3], [np.nan] * 3]), None, 3)
    with pytest.raises(EncoderError, match="encoder 'counting' output.*dimension 3 does not match "
                                           "the predictor's 4"):
        embed_or_encode(["a"], None, CountingEncoder(), 4)
    with pytest.raises(EncoderError, match="the given embeddings.*row 1 has NaN"):
        embed_or_encode(["a"], np.array([[1.0, np.nan, 3.0]]), CountingEncoder(), 3)


def test_minilm_runs_without_sentence_transformers_and_gives_its_embeddings(minilm):
    """MiniLM's layout (transformer, mean pooling, normalise) runs on transformers alone; the
    vectors must be sentence-transformers' own, whatever the batch and text lengths: equal within
    float32 rounding (the forward passes are cut by token length, so padding differs)."""
    from sentence_transformers import SentenceTransformer

    from r2ray.encoders import MeanPooledTransformer

    rng = np.random.default_rng(3)
    words = "route the query to a model with a budget of tokens; why does it cost so much".split()
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 300, 30)]
    texts += ["", " ", "héllo wörld ✓ 漢字", "x" * 4000, "What is 2 + 2?"]
    assert isinstance(minilm._model, MeanPooledTransformer)
    reference = SentenceTransformer(str(encoder_path(MINILM)), device="cpu")
    for batch in (3, 32):              # several length-sorted batches; one padded batch
        ours = load_encoder(MINILM, device="cpu", batch_size=batch).encode(texts)
        theirs = reference.encode(texts, batch_size=batch, convert_to_numpy=True)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    alone = np.concatenate([load_encoder(MINILM, device="cpu").encode([t]) for t in texts[:6]])
    np.testing.assert_allclose(alone, load_encoder(MINILM, device="cpu").encode(texts)[:6],
                               rtol=0, atol=1e-6)   # a text's vector does not depend on its call


def _brute_force_chunks(lengths, cap, overhead):
    """The cheapest split by trying every one (2^(N-1) of them)."""
    n, best = len(lengths), (np.inf, None)
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        chunks = list(zip(cuts, cuts[1:]))
        if any(b - a > cap for a, b in chunks):
            continue
        cost = sum(overhead + (b - a) * lengths[a] for a, b in chunks)
        best = min(best, (cost, chunks), key=lambda x: x[0])
    return best


def test_bfloat16_minilm_is_within_a_cosine_of_1e_4_of_float32(minilm):
    """The routing paths' precision: vectors still float32 and unit length, each within cosine
    0.9999 of float32's, the same text giving the same vector alone and inside a call."""
    texts = ["What is 2 + 2?", "Write a sonnet about the sea, in the style of Shakespeare.",
             "Fix this segfault in C: int *p = 0; *p = 1;", "Translate 'cat' to French.",
             "Explain, step by step, why the square root of 2 is irrational. " * 6]
    fast = load_encoder(MINILM, device="cpu", batch_size=2, precision="bfloat16")
    assert fast.precision == "bfloat16" and minilm.precision == "float32"
    exact, vectors = minilm.encode(texts), fast.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == exact.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert (vectors * exact).sum(axis=1).min() > 0.9999
    alone = fast.encode([texts[3]])[0]
    assert alone @ vectors[3] > 0.9999


def test_precision_auto_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    import r2ray.encoders as encoders

    assert encoders.resolve_precision("float32", "cpu") == "float32"
    assert encoders.resolve_precision("bfloat16", "cpu") == "bfloat16"
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda native=native: native)
        assert encoders.resolve_precision("auto", "cpu") == expected
    with pytest.raises(ValueError, match="precision must be one of.*'float16'"):
        encoders.resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_encoder(MINILM, device="cpu", precision="fp8")


def test_length_chunks_are_the_cheapest_split_within_the_cap():
    from r2ray.encoders import length_chunks

    rng = np.random.default_rng(0)
    for _ in range(60):
        n, cap, overhead = int(rng.integers(1, 10)), int(rng.integers(1, 6)), float(rng.integers(0, 80))
        lengths = np.sort(rng.integers(1, 60, n))[::-1]
        chunks = length_chunks(lengths, cap, overhead)
        assert [a for a, _ in chunks] == [0] + [b for _, b in chunks[:-1]] and chunks[-1][1] == n
        assert all(0 < b - a <= cap for a, b in chunks)
        cost = sum(overhead + (b - a) * lengths[a] for a, b in chunks)
        assert cost == pytest.approx(_brute_force_chunks(lengths, cap, overhead)[0])
    assert length_chunks(np.array([], dtype=np.int64), 4, 64.0) == []
    # one long query and many short ones: the long one goes alone, the short ones together
    assert length_chunks(np.array([200] + [20] * 15), 32, 64.0) == [(0, 1), (1, 16)]
    assert length_chunks(np.array([200] + [20] * 15), 32, np.inf) == [(0, 16)]   # no split
    assert length_chunks(np.arange(10, 0, -1), 4, np.inf) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("change", ["cls pooling", "lower case", "prompt", "dense layer",
                                    "left padding", "no tokenizer.json"])
def test_other_layouts_still_run_on_sentence_transformers(tmp_path, change, monkeypatch):
    import json

    import r2ray.encoders as encoders
    from r2ray.encoders import mean_pooled_layout

    source = encoder_path(MINILM)
    for item in source.rglob("*"):
        target = tmp_path / item.relative_to(source)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item)
    assert mean_pooled_layout(tmp_path) == {"max_length": 256, "normalize": True}

    def rewrite(name, edit):
        document = json.loads((tmp_path / name).read_text())
        (tmp_path / name).unlink()
        (tmp_path / name).write_text(json.dumps(edit(document)))

    if change == "cls pooling":
        rewrite("1_Pooling/config.json", lambda d: {**d, "pooling_mode_mean_tokens": False,
                                                    "pooling_mode_cls_token": True})
    elif change == "lower case":
        rewrite("sentence_bert_config.json", lambda d: {**d, "do_lower_case": True})
    elif change == "prompt":
        rewrite("config_sentence_transformers.json", lambda d: {**d, "prompts": {"q": "query: "}})
    elif change == "left padding":
        rewrite("tokenizer_config.json", lambda d: {**d, "padding_side": "left"})
    elif change == "no tokenizer.json":
        (tmp_path / "tokenizer.json").unlink()
    else:
        rewrite("modules.json", lambda d: [*d[:2], {"idx": 2, "name": "2", "path": "2_Dense",
                                                    "type": "sentence_transformers.models.Dense"}])
    assert mean_pooled_layout(tmp_path) is None
    if change == "cls pooling":          # and such a folder loads as sentence-transformers
        from sentence_transformers import SentenceTransformer

        encoder = load_encoder(str(tmp_path), device="cpu")
        assert isinstance(encoder._model, SentenceTransformer) and encoder.dimension == 384
        # bfloat16 runs the mean-pooled layout only: auto keeps this one in float32 (on any CPU)
        monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda: True)
        assert load_encoder(str(tmp_path), device="cpu", precision="auto").precision == "float32"
        with pytest.raises(EncoderError, match="'bfloat16' needs a transformer with mean pooling"):
            load_encoder(str(tmp_path), device="cpu", precision="bfloat16")


ENCODE_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
from r2ray.encoders import MINILM, load_encoder
vectors = load_encoder(MINILM, device="cpu", precision="float32").encode(sys.argv[2:])
np.save(sys.argv[1], vectors)
print("transformers imported:", "transformers" in sys.modules)
"""


def test_minilm_is_traced_once_and_later_processes_load_it_without_transformers(tmp_path):
    """The first load traces the transformer into R2RAY_ENCODER_CACHE; a later process (a scoring
    worker's start) loads that file without importing transformers, and gets the same vectors."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "R2RAY_ENCODER_CACHE": str(tmp_path / "cache")}
    texts = ["What is 2 + 2?", "Write a sonnet about the sea. " * 20, "x" * 3000, ""]
    runs = []
    for name in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-c", ENCODE_IN_A_FRESH_PROCESS,
                               str(tmp_path / f"{name}.npy"), *texts],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(done.stdout.strip())
        if name == "cold":
            assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [
                ".fingerprint", ".pt"]                   # the trace and its folder's memo
    assert runs == ["transformers imported: True", "transformers imported: False"]
    np.testing.assert_array_equal(np.load(tmp_path / "warm.npy"), np.load(tmp_path / "cold.npy"))


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:DeprecationWarning")
def test_a_broken_traced_file_is_traced_again_and_an_untraceable_model_runs_eagerly(
        tmp_path, monkeypatch, capsys):
    import os

    import torch

    import r2ray.encoders as encoders

    path = str(encoder_path(MINILM))
    monkeypatch.setenv("R2RAY_ENCODER_CACHE", str(tmp_path))
    file = encoders.traced_file(path, "cpu", "float32")
    file.write_bytes(b"not a TorchScript archive")
    input_ids = torch.tensor([[101, 2054, 2003, 1016, 102, 0], [101, 7592, 102, 0, 0, 0]])
    mask = input_ids != 0
    with torch.inference_mode():
        retraced = encoders.traced_transformer(path, "cpu", "float32")(input_ids, mask)
        assert "cannot be loaded" in capsys.readouterr().err
        assert torch.equal(torch.jit.load(str(file))(input_ids, mask), retraced)  # file replaced

        def untraceable(model):
            raise RuntimeError("no tracing here")

        monkeypatch.setattr(encoders, "_trace", untraceable)
        os.utime(file, (0, 0))
        eager = encoders.traced_transformer(path, "cpu", "float32")  # the good file loads: no trace
        assert file.stat().st_mtime > 0                             # touched: used, kept longest
        assert torch.equal(eager(input_ids, mask), retraced)
        file.unlink()
        eager = encoders.traced_transformer(path, "cpu", "float32")
        assert "cannot be traced (RuntimeError: no tracing here)" in capsys.readouterr().err
        assert not file.exists()
        torch.testing.assert_close(eager(input_ids, mask), retraced, rtol=0, atol=1e-5)


def test_the_traced_file_is_keyed_by_the_folder_contents_precision_and_cache_setting(
        tmp_path, monkeypatch):
    """Every install of the same files (a new venv or clone: another path, other modification
    times) shares one traced copy; other contents, precision or wrapper get another."""
    import os
    import shutil

    from r2ray.encoders import traced_file

    folder = tmp_path / "venv1" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("R2RAY_ENCODER_CACHE", str(tmp_path / "cache"))
    first = traced_file(str(folder), "cpu", "float32")
    assert first.parent == tmp_path / "cache" and first == traced_file(str(folder), "cpu", "float32")
    assert first.name.startswith("model-cpu-float32-")
    reinstalled = shutil.copytree(folder, tmp_path / "venv2" / "model", copy_function=shutil.copy)
    os.utime(reinstalled / "config.json", (0, 0))
    assert traced_file(str(reinstalled), "cpu", "float32") == first
    assert traced_file(str(folder), "cpu", "bfloat16") != first
    (folder / "model.safetensors").write_bytes(b"weights")        # another file: another copy
    second = traced_file(str(folder), "cpu", "float32")
    assert second != first
    monkeypatch.setattr("r2ray.encoders.TRACE_FORMAT", 2)          # another wrapper: another copy
    assert traced_file(str(folder), "cpu", "float32") not in (first, second)
    monkeypatch.setenv("R2RAY_ENCODER_CACHE", "off")
    assert traced_file(str(folder), "cpu", "float32") is None


@pytest.mark.filterwarnings("ignore:.*torch.jit.script:DeprecationWarning")
def test_a_new_trace_removes_the_stale_traces_of_its_folder_device_and_precision(
        tmp_path, monkeypatch):
    """Beyond the 2 most recently used, older traces of the folder name on this device and
    precision go, with the names from before content keys; other traces stay."""
    import os
    import time

    import torch

    import r2ray.encoders as encoders

    monkeypatch.setenv("R2RAY_ENCODER_CACHE", str(tmp_path / "cache"))
    file = encoders.traced_file(model_folder(tmp_path / "model", b"weights v2"), "cpu", "float32")
    now = time.time()

    def copy(name: str, age_s: float):
        path = file.with_name(name)
        path.write_bytes(b"an older trace")
        os.utime(path, (now - age_s, now - age_s))
        return path

    used = copy(f"model-cpu-float32-{'0' * 16}.pt", 10)
    stale = [copy(f"model-cpu-float32-{'1' * 16}.pt", 100),
             copy(f"model-{'2' * 16}.pt", 200)]                   # named before content keys
    others = [copy(f"model-cpu-bfloat16-{'3' * 16}.pt", 900),
              copy(f"other-cpu-float32-{'4' * 16}.pt", 900),
              copy(f"{file.name}.tmp-123-ab", 900)]     # being written by another process
    encoders._save_traced(torch.jit.script(torch.nn.Identity()), file,
                          encoders.older_traces(file, "model"))
    assert file.exists() and used.exists() and all(p.exists() for p in others)
    assert not any(p.exists() for p in stale)


def test_with_the_cache_off_the_model_runs_eagerly_and_a_disagreeing_trace_is_not_used(
        tmp_path, monkeypatch, capsys):
    import torch

    import r2ray.encoders as encoders

    path = str(encoder_path(MINILM))
    input_ids = torch.tensor([[101, 2054, 2003, 1016, 102]])
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    monkeypatch.setenv("R2RAY_ENCODER_CACHE", "off")
    with torch.inference_mode():
        eager = encoders.traced_transformer(path, "cpu", "float32")
        assert not isinstance(eager, torch.jit.ScriptModule)      # no trace without a cache
        want = eager(input_ids, mask)

        monkeypatch.setenv("R2RAY_ENCODER_CACHE", str(tmp_path))
        monkeypatch.setattr(encoders, "_trace", lambda model: (
            lambda ids, attention: torch.zeros(*ids.shape, 384)))   # a trace that bakes in junk
        got = encoders.traced_transformer(path, "cpu", "float32")
        assert "the trace disagrees with the model on one unpadded text" in capsys.readouterr().err
        assert list(tmp_path.glob("*.pt")) == []                 # not saved
        torch.testing.assert_close(got(input_ids, mask), want, rtol=0, atol=1e-6)


def encoder_benchmark():
    """``benchmarks/encoder.py`` as a module."""
    from benchmark_scripts import benchmark_module

    return benchmark_module("encoder")


def test_the_encoder_benchmark_counts_padded_tokens_from_the_models_plan(minilm, monkeypatch):
    """``benchmarks/encoder.py``'s padding figure reads ``MeanPooledTransformer.plan``: one
    text per pass pads nothing; three texts of 3, 4 and 8 tokens in one pass pad to 3 × 8."""
    benchmark = encoder_benchmark()
    texts = ["a", "a b", "a b c d e f"]          # [CLS] ... [SEP]: 3, 4 and 8 tokens
    assert benchmark.padding(minilm._model, [texts], batch_size=1) == 1.0
    monkeypatch.setattr(minilm._model, "overhead", np.inf)   # fixed slices: one pass of three
    assert benchmark.padding(minilm._model, [texts], batch_size=3) == pytest.approx(24 / 15)


def test_the_encoder_benchmarks_objective_loss_is_a_share_of_the_gain_over_the_cheapest_arm():
    """The precision benchmark's "objective lost, % of routing's gain over the cheapest arm"
    divided by the gain over the arm of lowest objective (docs/design.md quotes it): query 0's
    gain over its cheapest arm (value 0) is 1, over its worst (value -5) 6, so a decision that
    loses all of the first read as 1/7 lost (review AZ). An unscored (NaN) arm is never the
    cheapest, however low its cost."""
    value = np.array([[0.0, 1.0, -5.0], [np.nan, 2.0, 1.0]])
    cost_usd = np.array([[1.0, 2.0, 3.0], [0.5, 2.0, 3.0]])
    exact, fast = np.array([1, 1]), np.array([0, 1])
    share = encoder_benchmark().objective_lost_share(value, cost_usd, exact, fast)
    assert share == pytest.approx(1.0)   # lost 1 of a gain of 1 + 0 over the cheapest arms


def test_texts_that_are_not_a_list_of_str_are_an_error_naming_the_row(minilm):
    """One str was encoded a character a row (5 vectors for "hello"); None, bytes or a lone
    surrogate failed inside the tokenizer ("TextEncodeInput must be Union[...]") or the cache
    (AttributeError), naming no row (review Z)."""
    from r2ray.embedding_cache import embed_texts

    with pytest.raises(EncoderError, match="one str"):
        minilm.encode("hello")
    for texts, row in ((["ok", None], 2), ([b"bytes"], 1), (["ok", "ok", "\ud800x"], 3)):
        for encode in (minilm.encode, lambda texts: embed_texts(minilm, texts)):
            with pytest.raises(EncoderError, match=f"row {row} "):
                encode(texts)
    assert minilm.encode(("", "a tuple")).shape == (2, 384)
