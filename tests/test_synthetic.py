"""The synthetic world: determinism, streaming, file layouts, and every realism fact it claims."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2ray.bench import io as bench_io
from r2ray.bench.schema import validate_bench
from r2ray.bench.stats import bench_stats
from r2ray.bench.synthetic import (BLOCK_QUERIES, EMBEDDING_DIM, World, WorldError, query_id,
                                   synth_backlog, synth_bench, write_world)
from r2ray.bench.world import TOPIC_NAMES, TOPICS, answer_setting, model_size_b
from r2ray.catalog import DEFAULT_BUDGET, catalog_from_dict, load_catalog
from r2ray.cli import main
from r2ray.predictor.data import bench_arrays
from r2ray.prompting import estimate_tokens, length_suffix, max_tokens_for
from r2ray.routing import arm_caps

N_FACTS = 4096  # queries behind every realism assertion


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def world(catalog):
    return World(catalog, seed=7)


@pytest.fixture(scope="module")
def sample(world):
    """One chunk with truth, outcomes and its bench table, computed once."""
    chunk = world.chunk(0, N_FACTS)
    return chunk, chunk.bench_table()


def arm_columns(catalog):
    budget = np.array([a.budget_tokens for a in catalog.arms])
    model = np.array([catalog.model_names.index(a.model) for a in catalog.arms])
    return model, budget


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- determinism and streaming ---------------------------------------------------------------------
def write_all(catalog, folder, seed=0, chunk_queries=4096, n=1100):
    paths = {name: folder / f"{name}.parquet" for name in ("bench", "backlog", "truth")}
    write_world(catalog, n_queries=n, seed=seed, bench_uri=str(paths["bench"]),
                backlog_uri=str(paths["backlog"]), truth_uri=str(paths["truth"]), embeddings=True,
                chunk_queries=chunk_queries)
    return paths


def test_same_seed_gives_byte_identical_files(catalog, tmp_path):
    first = write_all(catalog, tmp_path / "a")
    second = write_all(catalog, tmp_path / "b")
    other = write_all(catalog, tmp_path / "c", seed=1)
    for name in first:
        assert sha256(first[name]) == sha256(second[name]), name
        assert sha256(first[name]) != sha256(other[name]), name
    assert (tmp_path / "a" / "bench.catalog.yaml").read_text() == catalog.to_yaml()


def test_chunk_size_does_not_change_content(catalog, world, tmp_path):
    whole = world.chunk(0, 2500)
    pieces = list(world.iter_chunks(2500, chunk_queries=700))
    assert [p.n for p in pieces] == [700, 700, 700, 400]
    assert pa.concat_tables([p.bench_table() for p in pieces]).equals(whole.bench_table())
    assert pa.concat_tables([p.truth_table() for p in pieces]).equals(whole.truth_table())
    small = write_all(catalog, tmp_path / "small", chunk_queries=1000)  # rounded to 1 block
    large = write_all(catalog, tmp_path / "large", chunk_queries=100_000)
    for name in small:
        assert pq.read_table(small[name]).equals(pq.read_table(large[name])), name


def test_query_content_depends_only_on_seed_and_index(catalog, world):
    late = world.chunk(BLOCK_QUERIES + 10, BLOCK_QUERIES + 20)
    early = world.chunk(0, BLOCK_QUERIES + 20)
    assert late.query == early.query[-10:]
    assert late.query_id == [query_id(7, i) for i in range(BLOCK_QUERIES + 10, BLOCK_QUERIES + 20)]
    np.testing.assert_array_equal(late.outcomes[1], early.outcomes[1][-10:])
    np.testing.assert_array_equal(late.expected_quality, early.expected_quality[-10:])


def test_write_streams_bounded_chunks(catalog, tmp_path, monkeypatch):
    written = []
    original = bench_io.TableWriter.write

    def record(self, table):
        written.append((self.uri.rsplit("/", 1)[-1], table.num_rows))
        original(self, table)

    monkeypatch.setattr(bench_io.TableWriter, "write", record)
    write_world(catalog, n_queries=2 * BLOCK_QUERIES + 5, seed=0,
                bench_uri=str(tmp_path / "bench.parquet"), backlog_uri=str(tmp_path / "q.jsonl"),
                chunk_queries=10)  # rounded up to one block
    bench_rows = [rows for name, rows in written if name == "bench.parquet"]
    assert bench_rows == [BLOCK_QUERIES * catalog.n_arms] * 2 + [5 * catalog.n_arms]
    assert [rows for name, rows in written if name == "q.jsonl"] == [BLOCK_QUERIES] * 2 + [5]


def test_iter_chunks_is_lazy(world):
    chunks = world.iter_chunks(10**9, chunk_queries=100)  # a billion queries: only the first is made
    first = next(chunks)
    assert (first.start, first.n) == (0, 100)


# ---- layouts ---------------------------------------------------------------------------------------
def test_file_layouts_and_join_keys(catalog, tmp_path):
    paths = write_all(catalog, tmp_path, n=300)
    bench = bench_io.read_bench(str(paths["bench"]), catalog)
    backlog = pq.read_table(paths["backlog"])
    truth = pq.read_table(paths["truth"])
    assert bench.num_rows == 300 * catalog.n_arms
    assert backlog.column_names == ["query_id", "query", "input_tokens", "embedding"]
    assert backlog.schema.field("embedding").type == pa.list_(pa.float32(), EMBEDDING_DIM)
    assert set(bench.column("query_id").to_pylist()) == set(backlog.column("query_id").to_pylist())
    assert truth.column("query_id").equals(backlog.column("query_id"))
    assert truth.schema.field("expected_quality").type == pa.list_(pa.float32(), catalog.n_arms)
    meta = truth.schema.metadata
    assert meta[b"r2ray.catalog_fingerprint"].decode() == catalog.fingerprint
    assert json.loads(meta[b"r2ray.arms"])[17] == ["Gemma-3-1B", 20]
    assert json.loads(meta[b"r2ray.world"])["seed"] == 0
    in_memory = synth_backlog(catalog, 300, seed=0, embeddings=True)
    assert in_memory.column("embedding").equals(backlog.column("embedding"))


def test_bench_rows_are_valid_and_costed(catalog, sample):
    chunk, bench = sample
    validate_bench(bench, "synthetic", catalog)
    first = bench.slice(0, catalog.n_arms).to_pylist()
    assert [(r["model"], r["budget"]) for r in first] == [tuple(a) for a in catalog.arms]
    default_row = next(r for r in first if r["budget"] == DEFAULT_BUDGET)
    assert first[20]["budget"] != DEFAULT_BUDGET
    for row in (first[20], default_row):
        # the bill of the prompt sent: a budgeted arm's carries the length instruction
        sent = row["input_tokens"] + (0 if row["budget"] == DEFAULT_BUDGET
                                      else estimate_tokens(length_suffix(row["budget"])))
        expected = catalog.cost_usd(row["model"], sent, row["output_tokens"])
        assert row["cost_usd"] == pytest.approx(expected, rel=1e-12)
    assert set(bench.column("category").to_pylist()) == set(TOPIC_NAMES)


def test_a_bench_without_cost_usd_is_billed_as_the_world_bills_it(catalog, sample):
    # before the fix: bench_arrays priced a row with no cost_usd at input × p_in + output ×
    # p_out, the length instruction left out, while ĉ (and the world's bill) carry it: a
    # budgeted cell up to a third under the bill, so the spend simulation and the evaluation
    # compared ĉ with a "realised" cost it did not price
    _, bench = sample
    recorded = bench_arrays(bench, catalog).cost_usd
    priced = bench_arrays(bench.drop_columns(["cost_usd"]), catalog).cost_usd
    assert np.array_equal(np.isnan(priced), np.isnan(recorded))
    covered = ~np.isnan(recorded)
    assert np.allclose(priced[covered], recorded[covered], rtol=1e-12, atol=0)


def test_the_realised_spend_benchmark_bills_a_null_cost_as_the_world_does(catalog, tmp_path):
    # before the fix: benchmarks/realised_spend.py checked the world's cost_usd against input ×
    # p_in + output × p_out ("should agree to rounding": 58 % apart, the instruction), and a
    # null cost_usd went to reconcile, which priced it at the query's tokens alone
    from benchmark_scripts import benchmark_module

    benchmark = benchmark_module("realised_spend")
    backlog, bench = benchmark.write_route_world(str(tmp_path), catalog, 30, 12)
    table = pq.read_table(bench)
    world_bill = table.column("cost_usd").to_numpy()
    nulled = np.where(np.arange(table.num_rows) % 3 == 0, np.nan, world_bill)
    pq.write_table(table.set_column(table.schema.get_field_index("cost_usd"), "cost_usd",
                                    pa.array(nulled, from_pandas=True)), bench)
    read, note = benchmark.read_bench_outcomes(bench, backlog, catalog)
    assert "relative gap to routing.call_cost_usd at catalogue prices: 0.0e+00" in note
    assert np.allclose(read.column("cost_usd").to_numpy(), world_bill, rtol=1e-12, atol=0)


def test_truth_is_the_exact_expectation_of_the_bench(catalog, sample):
    chunk, _ = sample
    tokens, label, _ = chunk.outcomes
    quality, expected_tokens = chunk.truth
    assert abs(label.mean() - quality.mean()) < 0.005
    per_arm_gap = np.abs(tokens.mean(0) - expected_tokens.mean(0)) / expected_tokens.mean(0)
    assert per_arm_gap.max() < 0.08
    assert abs(tokens.mean() / expected_tokens.mean() - 1) < 0.01


def test_embeddings_are_unit_vectors_a_predictor_can_learn(world):
    chunk = world.chunk(0, 3000, embeddings=True)
    x = chunk.embedding
    assert x.shape == (3000, EMBEDDING_DIM) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    design = np.c_[x, np.ones(len(x))]
    train, test = slice(0, 2000), slice(2000, 3000)
    y = chunk.expected_quality
    weights = np.linalg.solve(design[train].T @ design[train] + np.eye(design.shape[1]),
                              design[train].T @ y[train])
    residual = ((y[test] - design[test] @ weights) ** 2).sum(0)
    r2 = 1 - residual / ((y[test] - y[test].mean(0)) ** 2).sum(0)
    assert r2.mean() > 0.5  # ridge on 2,000 queries explains most per-arm quality variance


# ---- realism: each observed fact the world claims ---------------------------------------------------
def test_quality_rises_with_budget_and_saturates_at_needed_length(catalog, sample):
    chunk, _ = sample
    quality = chunk.expected_quality
    model, budget = arm_columns(catalog)
    for m in range(len(catalog.models)):
        curve = quality[:, (model == m) & (budget > 0)].mean(0)
        assert curve[-1] > curve[0] + 0.25, catalog.model_names[m]
        assert np.all(np.diff(curve) > -0.02), catalog.model_names[m]
    llama = catalog.model_names.index("Llama-3.1-70B-Instruct")
    cols = np.flatnonzero((model == llama) & (budget > 0))
    ratio = budget[cols][None, :] / chunk.features.needed_tokens[:, None]
    relative = quality[:, cols] / quality[:, cols].max(1, keepdims=True)
    assert relative[ratio <= 0.25].mean() < 0.7   # far below the needed length: much worse
    assert relative[ratio >= 3].mean() > 0.93     # past it: flat


def test_large_models_obey_small_budgets_small_ones_do_not(catalog, sample):
    _, bench = sample
    stats = bench_stats(bench, catalog).to_pylist()
    at_10 = {r["model"]: r["share_within_1_1x"] for r in stats if r["budget"] == 10}
    sizes = {m.name: model_size_b(m.name, m.output_per_m) for m in catalog.models}
    large = [m for m, size in sizes.items() if size >= 30]
    small = [m for m, size in sizes.items() if size < 4]
    assert len(large) == 4 and len(small) == 4
    assert all(at_10[m] > 0.8 for m in large), at_10
    assert all(at_10[m] < 0.1 for m in small), at_10


def test_default_answers_are_long_and_heavy_tailed(catalog, sample):
    chunk, _ = sample
    _, budget = arm_columns(catalog)
    tokens = chunk.outcomes[0][:, budget == DEFAULT_BUDGET]
    median, p99 = np.percentile(tokens, [50, 99])
    assert 200 < median < 1000
    assert p99 > 2000 and p99 / median > 4
    assert tokens.mean() > 1.2 * median


def test_prices_span_about_100x(catalog, sample):
    _, bench = sample
    stats = bench_stats(bench, catalog).to_pylist()
    cost = [r["mean_cost_usd"] for r in stats if r["budget"] == DEFAULT_BUDGET]
    assert max(cost) / min(cost) > 50


def test_many_queries_are_easy_for_every_model(catalog, sample):
    chunk, _ = sample
    _, budget = arm_columns(catalog)
    default_quality = chunk.expected_quality[:, budget == DEFAULT_BUDGET]
    assert (default_quality.min(1) >= 0.7).mean() > 0.2


def test_math_favours_small_specialists(catalog, sample):
    chunk, bench = sample
    model, budget = arm_columns(catalog)
    default = chunk.expected_quality[:, budget == DEFAULT_BUDGET]
    names = catalog.model_names
    math = chunk.features.topic == TOPIC_NAMES.index("math")
    specialist = names.index("Qwen2.5-Math-7B-Instruct")
    on_math = default[math].mean(0)
    for general in ("Mistral-7B-v0.2", "Llama-3.1-70B-Instruct", "Qwen3-235B-A22B-Instruct"):
        assert on_math[specialist] > on_math[names.index(general)], general
    assert default[~math].mean(0)[specialist] < default[~math].mean(0)[names.index("Mistral-7B-v0.2")]
    prices = {m.name: m.output_per_m for m in catalog.models}
    assert prices["Qwen2.5-Math-7B-Instruct"] < prices["Llama-3.1-70B-Instruct"] / 3


def test_judged_labels_are_noisy_and_coarse(sample):
    chunk, bench = sample
    label = chunk.outcomes[1]
    binary = np.array([TOPICS[t].judged == "binary" for t in chunk.features.topic])
    assert set(np.unique(label[binary])) == {0.0, 1.0}
    graded = np.unique(label[~binary])
    np.testing.assert_allclose(graded, np.round(graded, 1))
    assert len(graded) == 11
    correlation = np.corrcoef(label.ravel(), chunk.expected_quality.ravel())[0, 1]
    assert 0.5 < correlation < 0.95


def test_truncated_means_the_hard_cap_cut_the_answer(catalog, sample):
    chunk, bench = sample
    rows = bench.slice(0, 40 * catalog.n_arms).to_pylist()
    spec = {m.name: m.context for m in catalog.models}
    for row in rows:
        cap = max_tokens_for(row["budget"], spec[row["model"]], row["input_tokens"])
        assert row["output_tokens"] <= cap
        if row["truncated"]:
            assert row["output_tokens"] == cap
    assert 0.05 < np.mean([r["truncated"] for r in rows]) < 0.9


@pytest.mark.parametrize("max_output_tokens", [None, 700])
def test_the_worlds_caps_are_the_routers_caps_for_every_arm(max_output_tokens):
    """One rule: the world cuts answers exactly where a routed request's max_tokens would."""
    model = {"name": "Llama-3.1-70B-Instruct", "input_per_m": 0.12, "output_per_m": 0.3,
             "context": 131072}
    catalog = catalog_from_dict({"budgets": [10, 80, 4000, "default"], "models": [
        model | ({} if max_output_tokens is None else {"max_output_tokens": max_output_tokens}),
        {"name": "Qwen2.5-Math-1.5B-Instruct", "input_per_m": 0.01, "output_per_m": 0.02,
         "context": 4096}]})
    world = World(catalog, seed=3)
    chunk = world.chunk(0, 300)
    setting = answer_setting(chunk.features, chunk.input_tokens, world.traits, world.arm_model,
                             world.arm_budget, world.knobs)
    caps = arm_caps(catalog, chunk.input_tokens)
    np.testing.assert_array_equal(np.broadcast_to(setting.cap, caps.shape), caps)
    default = catalog.arm_of(model["name"], DEFAULT_BUDGET)
    assert (caps[:, default] == (max_output_tokens or 4000)).all()
    tokens, _, truncated = chunk.outcomes
    assert (tokens <= caps).all() and (tokens[truncated] == caps[truncated]).all()


# ---- text and model names ---------------------------------------------------------------------------
def test_query_text_carries_topic_and_difficulty_words(world):
    chunk = world.chunk(0, 2000)
    assert len(set(chunk.query)) > 0.95 * chunk.n
    difficulty = chunk.features.difficulty
    hard_words = ("Hard", "challenging", "Expert", "tricky", "Graduate", "Difficult", "Olympiad")
    says_hard = np.array([any(w in q for w in hard_words) for q in chunk.query])
    assert says_hard[difficulty > 0.5].mean() > 0.6 > 0.1 > says_hard[difficulty < 0.1].mean()
    math = chunk.features.topic == TOPIC_NAMES.index("math")
    verbs = ("Compute", "Find", "Determine", "Calculate", "Evaluate", "Work out")
    assert all(any(v in q for v in verbs) for q, is_math in zip(chunk.query, math) if is_math)


def test_minilm_picks_up_topic_and_difficulty(world):
    from r2ray.encoders import load_encoder

    chunk = world.chunk(0, 300)
    x = load_encoder("minilm", device="cpu").encode(chunk.query)
    topic, difficulty = chunk.features.topic, chunk.features.difficulty
    train, test = slice(0, 200), slice(200, 300)
    centroids = np.stack([x[train][topic[train] == t].mean(0) for t in range(len(TOPICS))])
    assert (np.argmax(x[test] @ centroids.T, 1) == topic[test]).mean() > 0.9
    design = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(design[train].T @ design[train] + np.eye(design.shape[1]),
                        design[train].T @ difficulty[train])
    # the text's cues correlate 0.72 with the hidden difficulty; a probe on 200 queries gets ~0.4
    assert np.corrcoef(design[test] @ w, difficulty[test])[0, 1] > 0.25


def test_model_traits_come_from_names_with_a_fallback():
    assert model_size_b("Qwen3-0.6B", 0.46) == 0.6
    assert model_size_b("Qwen2.5-Math-1.5B-Instruct", 0.02) == 1.5
    assert model_size_b("Llama-3.2-3B-Instruct", 0.02) == 3
    assert model_size_b("Qwen3-235B-A22B-Instruct", 0.54) == 235
    assert model_size_b("Mixtral-8x7B-Instruct", 0.6) == 56
    assert model_size_b("meta-llama/llama-3.1-8b-instruct", 0.05) == 8
    assert model_size_b("GLM-4.5-Air", 1.55) == 106
    assert model_size_b("acme-mystery", 2.0) == 100  # priced like a large model
    odd = catalog_from_dict({"budgets": [16, "default"], "models": [
        {"name": "acme-mystery", "input_per_m": 1, "output_per_m": 2, "context": 8000},
        {"name": "tiny-coder", "input_per_m": 0, "output_per_m": 0, "context": 2048}]})
    bench = synth_bench(odd, 50, seed=3)
    assert validate_bench(bench, "odd", odd).num_rows == 50 * 4


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_synth_writes_everything(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    code = main(["bench", "synth", "--queries", "120", "--seed", "4", "--out", str(out),
                 "--backlog", str(tmp_path / "backlog.parquet"), "--truth", str(tmp_path / "t.parquet"),
                 "--embeddings"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "120 queries × 176 arms" in printed and "21,120 rows" in printed
    assert len(out.read_text().splitlines()) == 120 * 176
    assert (tmp_path / "bench.catalog.yaml").exists()


@pytest.mark.parametrize("args, message", [
    (["--queries", "10"], "nothing to write"),
    (["--queries", "10", "--out", "x.parquet", "--embeddings"], "--embeddings"),
    (["--queries", "0", "--out", "x.parquet"], "positive integer"),
    (["--queries", "10", "--seed", "-1", "--out", "x.parquet"], "non-negative"),
])
def test_cli_synth_rejects_bad_arguments(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "synth", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_world_rejects_bad_seed_and_range(catalog):
    with pytest.raises(WorldError, match="seed"):
        World(catalog, seed=1.5)
    with pytest.raises(WorldError, match="range"):
        World(catalog).chunk(5, 2)


@pytest.mark.parametrize("flag", ["--out", "--backlog", "--truth"])
@pytest.mark.parametrize("name", ["bench", "bench.json", "bench.csv", "bench.PARQUET"])
def test_cli_synth_writes_only_names_the_readers_take(tmp_path, capsys, monkeypatch, flag, name):
    monkeypatch.chdir(tmp_path)
    others = [arg for other in ("--out", "--backlog", "--truth") if other != flag
              for arg in (other, f"{other[2:]}.parquet")]
    assert main(["bench", "synth", "--queries", "10", flag, name, *others]) == 2
    assert f"{flag} {name}: name a .parquet or .jsonl file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
