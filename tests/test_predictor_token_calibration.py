"""The shared token correction: mean (not geometric-type) tokens, at most the cap, saved with the
predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from predictor_world import planted_arrays, small_catalog

from r2ray.predictor import load_predictor, make_predictor, save_predictor
from r2ray.predictor import token_calibration
from r2ray.predictor.persist import CONFIG_FILE, PredictorVersionWarning
from r2ray.predictor.token_calibration import (BEYOND_TOKENS, TokenCalibration, arm_caps_tokens,
                                               fit_token_calibration)

SIGMA = 0.8


def lognormal_tokens(catalog, n: int, seed: int, sigma: float = SIGMA):
    """(geometric-type t̂ = exp(μ) − 1, realised T = exp(μ + ε) − 1 with ε ~ N(0, σ²)), [n, K]."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(np.log(5.0), np.log(60.0), size=(n, 1)) + np.zeros((1, catalog.n_arms))
    return np.expm1(mu), np.expm1(mu + rng.normal(0.0, sigma, size=mu.shape))


def test_the_correction_makes_log_normal_tokens_unbiased_for_the_mean():
    catalog = small_catalog(budgets=("default",))  # caps of 4,000+ tokens: far above these lengths
    tokens_hat, tokens = lognormal_tokens(catalog, 20_000, seed=0)
    held_out_hat, held_out = lognormal_tokens(catalog, 20_000, seed=1)
    bias = (1 + tokens).mean() / (1 + tokens_hat).mean()
    assert abs(bias / np.exp(SIGMA ** 2 / 2) - 1) < 0.02   # the geometric mean is low by e^(σ²/2)
    calibration = fit_token_calibration(held_out_hat, held_out, catalog)
    np.testing.assert_allclose(calibration.smearing, np.exp(SIGMA ** 2 / 2), rtol=0.05)  # per bin
    corrected = calibration.mean_tokens(tokens_hat.astype(np.float32))
    np.testing.assert_allclose(corrected.mean(axis=0), tokens.mean(axis=0), rtol=0.02)


def test_capped_mean_matches_monte_carlo_and_never_exceeds_the_cap():
    catalog = small_catalog(budgets=(20, 100, "default"), n_models=1)
    caps = arm_caps_tokens(catalog)
    assert caps.tolist() == [28, 110, 4000]  # budget + max(8, 10 %); default: the output cap
    tokens_hat, tokens = lognormal_tokens(catalog, 20_000, seed=2, sigma=1.0)
    held_out_hat, held_out = lognormal_tokens(catalog, 20_000, seed=3, sigma=1.0)
    capped = lambda t: np.minimum(t, caps)  # noqa: E731 — what an arm sent with max_tokens returns
    calibration = fit_token_calibration(held_out_hat, capped(held_out), catalog)
    corrected = calibration.mean_tokens(tokens_hat.astype(np.float32))
    assert (corrected <= caps).all()
    # Monte Carlo: E[min(T, cap)] over the queries, from a fresh draw
    np.testing.assert_allclose(corrected.mean(axis=0), capped(tokens).mean(axis=0), rtol=0.05)


def test_factors_per_quartile_of_t_hat_and_pooled_for_thin_arms():
    catalog = small_catalog(budgets=("default",))
    tokens_hat, tokens = lognormal_tokens(catalog, 400, seed=4)
    tokens[5:, 0] = np.nan                            # arm 0: five rows only
    calibration = fit_token_calibration(tokens_hat, tokens, catalog)
    ratio = (1 + tokens) / (1 + tokens_hat)
    assert (calibration.smearing[0] == np.nanmean(ratio)).all()
    quartile = np.searchsorted(np.quantile(tokens_hat[:, 1], [0.25, 0.5, 0.75]), tokens_hat[:, 1])
    np.testing.assert_allclose(calibration.smearing[1],   # Σ (1 + T) ÷ Σ (1 + t̂) per quartile
                               [(1 + tokens[quartile == b, 1]).sum()
                                / (1 + tokens_hat[quartile == b, 1]).sum() for b in range(4)])
    np.testing.assert_allclose(calibration.centres[1],
                               [tokens_hat[quartile == b, 1].mean() for b in range(4)])
    knots = calibration.centres[1][:, None].repeat(catalog.n_arms, axis=1).astype(np.float32)
    got = calibration.mean_tokens(knots)[np.arange(4), 1]  # at a bin's centre: its factor
    want = (1 + calibration.centres[1]) * calibration.smearing[1] - 1
    assert (np.diff(want) > 0).all()                       # rising: no knots pooled
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mean_tokens_never_falls_as_t_hat_rises_across_bin_edges():
    """Regression to the mean gives high-t̂ bins a smaller factor: each bin's own factor made the
    mean fall just across an edge (carrot_linear_all, 3,000 synthetic queries: by up to 25 %),
    reordering ĉ = price × t̂ within an arm. The map joins the bins' centres, pooled where they
    fall, so it is non-decreasing, and below the first centre or above the last it scales t̂ by
    that bin's factor."""
    catalog = small_catalog(budgets=("default",), n_models=1)
    rng = np.random.default_rng(7)
    tokens_hat = rng.uniform(0, 1000, size=(800, 1))
    tokens = np.maximum(300 + 0.2 * (tokens_hat - 300) + rng.normal(0, 20, tokens_hat.shape), 0)
    calibration = fit_token_calibration(tokens_hat, tokens, catalog)
    assert (np.diff(calibration.smearing[0]) < 0).all()   # shrinking factors: the old jump
    grid = np.sort(np.concatenate([np.linspace(0, 5000, 20_001), calibration.edges[0],
                                   np.nextafter(calibration.edges[0], np.inf)]))
    mapped = calibration.mean_tokens(grid[:, None].astype(np.float32))[:, 0].astype(np.float64)
    assert (np.diff(mapped) >= 0).all(), np.diff(mapped).min()
    first, last = calibration.centres[0][[0, -1]]
    low, high = grid <= first, grid >= last
    np.testing.assert_allclose(mapped[low], (1 + grid[low]) * calibration.smearing[0][0] - 1,
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(mapped[high], (1 + grid[high]) * calibration.smearing[0][-1] - 1,
                               rtol=1e-5)


def test_falling_bin_means_are_pooled_not_reversed():
    """Where t̂ is anti-informative (a higher bin with fewer tokens on average) the two knots
    pool into one at their mean t̂ and mean tokens: the map rises through it, never falls."""
    catalog = small_catalog(budgets=("default",), n_models=1)
    centres = np.array([[10.0, 100.0, 200.0, 400.0]])
    smearing = np.array([[2.0, 1.5, 0.5, 0.6]])   # E[1 + T]: 22, 151.5, 100.5, 240.6
    calibration = TokenCalibration(np.array([[50.0, 150.0, 300.0]]), smearing,
                                   arm_caps_tokens(catalog), centres)
    grid = np.linspace(0, 1000, 4001, dtype=np.float32)[:, None]
    mapped = calibration.mean_tokens(grid)[:, 0]
    assert (np.diff(mapped) >= 0).all()
    assert mapped[600] == np.float32((151.5 + 100.5) / 2 - 1)   # t̂ = 150: the pooled knot


def test_save_load_keeps_the_correction_and_older_files_still_load(tmp_path):
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=300, dim=8, seed=0)
    test, _ = planted_arrays(catalog, n_queries=20, dim=8, seed=9)
    predictor = make_predictor("per_arm_ridge").fit(train, catalog)
    assert predictor.token_calibration_.smearing.mean() > 1  # right-skewed: mean > centre
    loaded = load_predictor(save_predictor(predictor, str(tmp_path)))
    np.testing.assert_array_equal(loaded.token_calibration_.smearing,
                                  predictor.token_calibration_.smearing)
    np.testing.assert_array_equal(loaded.predict(test.embedding).output_tokens,
                                  predictor.predict(test.embedding).output_tokens)
    document = json.loads((tmp_path / CONFIG_FILE).read_text())
    del document["state"]["token_calibration"]        # as saved before the correction existed
    del document["document_sha256"]                   # (and before the document's digest)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.warns(PredictorVersionWarning, match="records no document_sha256"):
        older = load_predictor(str(tmp_path))
    assert older.token_calibration_ is None
    np.testing.assert_array_equal(older.predict(test.embedding).output_tokens,
                                  predictor._predict(test.embedding).output_tokens)


def take_along_rule(calibration, tokens_hat: np.ndarray) -> np.ndarray:
    """mean_tokens as first written: the bin's factor by take_along_axis, then np.clip."""
    tokens_hat = np.maximum(tokens_hat, 0.0).astype(np.float64)
    bins = (tokens_hat[:, :, None] > calibration.edges[None]).sum(axis=2)
    factor = np.take_along_axis(calibration.smearing[None], bins[:, :, None], axis=2)[..., 0]
    return np.clip((1.0 + tokens_hat) * factor - 1.0, 0.0,
                   calibration.cap_tokens).astype(np.float32)


def odd_tokens(rng, n: int, k: int) -> np.ndarray:
    """t̂ [n, K] float32 around, on and beyond bin edges and caps, with NaN, ±inf, -0.0, < 0."""
    tokens = rng.choice([rng.uniform(-5, 3000), 0.0, -0.0, 20.0, 100.0, np.nan, np.inf, -np.inf],
                        size=(n, k), p=[0.65, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    return np.where(rng.random((n, k)) < 0.5, rng.uniform(-5, 3000, size=(n, k)),
                    tokens).astype(np.float32)


def test_mean_tokens_is_bit_identical_to_the_take_along_rule():
    """The flat factor table built at construction gives exactly the first rule's values: on
    random calibrations (edges beyond use, factors < 1 and > 1, caps), and on one fitted, saved
    and loaded with a predictor."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 20))
        edges = np.round(rng.uniform(0, 800, size=(k, 3)))   # whole tokens: t̂ can sit on one
        edges[rng.random((k, 3)) < 0.2] = BEYOND_TOKENS
        edges = np.sort(edges, axis=1)
        calibration = TokenCalibration(edges, rng.uniform(0.0, 3.0, size=(k, 4)),
                                       rng.choice([20.0, 110.0, 440.0, 4096.0], size=k))
        tokens = odd_tokens(rng, int(rng.integers(1, 4)), k)
        on_edge = rng.random(tokens.shape) < 0.3
        tokens[on_edge] = np.broadcast_to(edges[:, 0], tokens.shape)[on_edge]
        got = calibration.mean_tokens(tokens)
        assert got.tobytes() == take_along_rule(calibration, tokens).tobytes(), trial


@pytest.mark.parametrize("chunk_cells", [1, 37, 1 << 16])
def test_mean_tokens_in_row_chunks_is_the_same_rule(monkeypatch, chunk_cells):
    """Row chunks (one row each, a few rows with a ragged last chunk, one chunk) give the rule's
    values for every row: none dropped, none shifted, NaN and ±inf where they were."""
    monkeypatch.setattr(token_calibration, "CHUNK_CELLS", chunk_cells)
    rng = np.random.default_rng(2)
    k = 6
    edges = np.sort(np.round(rng.uniform(0, 800, size=(k, 3))), axis=1)
    calibration = TokenCalibration(edges, rng.uniform(0.0, 3.0, size=(k, 4)),
                                   rng.choice([110.0, 4096.0], size=k))
    tokens = odd_tokens(rng, 53, k)
    tokens[4, 2], tokens[9, 0], tokens[52, 5] = np.nan, np.inf, -np.inf
    got = calibration.mean_tokens(tokens)
    assert got.dtype == np.float32 and got.shape == tokens.shape
    assert got.tobytes() == take_along_rule(calibration, tokens).tobytes()
    assert np.isnan(got[4, 2]) and calibration.mean_tokens(tokens[:0]).shape == (0, k)


def test_mean_tokens_is_bit_identical_after_save_and_load(tmp_path):
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=300, dim=8, seed=0)
    predictor = make_predictor("per_arm_ridge").fit(train, catalog)
    fitted = predictor.token_calibration_
    loaded = load_predictor(save_predictor(predictor, str(tmp_path))).token_calibration_
    rng = np.random.default_rng(1)
    for n in (1, 1, 9):
        tokens = odd_tokens(rng, n, catalog.n_arms)
        tokens[:, 0] = fitted.centres[0, 0]            # on a knot (float32 rounds it)
        assert loaded.mean_tokens(tokens).tobytes() == fitted.mean_tokens(tokens).tobytes()
    np.testing.assert_array_equal(loaded.centres, fitted.centres)
    step = TokenCalibration(fitted.edges, fitted.smearing, fitted.cap_tokens)  # saved before
    assert "centres" not in step.to_json()                                 # centres: as saved
    assert (TokenCalibration.from_json(step.to_json()).mean_tokens(tokens).tobytes()
            == take_along_rule(fitted, tokens).tobytes())
