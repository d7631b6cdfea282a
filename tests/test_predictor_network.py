"""The joint network: one forward pass for all arms; the monotone-in-budget head holds its promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from predictor_world import planted_arrays, small_catalog

from r2ray.catalog import DEFAULT_BUDGET, catalog_from_dict
from r2ray.predictor import make_predictor
from r2ray.predictor.network import NetworkConfig, R2Net, arm_table, budget_chain, chain_bias


def mixed_catalog():
    """Two models with different budget lists (one without a default arm)."""
    return catalog_from_dict({"budgets": [10, 100, 1000, "default"], "models": [
        {"name": "a", "input_per_m": 0.1, "output_per_m": 0.4, "context": 4096},
        {"name": "b", "input_per_m": 1.0, "output_per_m": 4.0, "context": 32768,
         "budgets": [50, 20, 400]},
    ]})


def random_network(catalog, monotone: str, seed: int, dim: int = 8) -> R2Net:
    torch.manual_seed(seed)
    arms = arm_table(catalog)
    network = R2Net(NetworkConfig(embedding_dim=dim, n_arms=catalog.n_arms, n_models=arms.n_models,
                                  n_budget_values=arms.n_budget_values, query_hidden=16,
                                  joint_hidden=16, head_hidden=8, monotone=monotone))
    chain, first = budget_chain(catalog, monotone)
    network.load_arms(arms, chain, first, np.zeros(dim), np.ones(dim))
    with torch.no_grad():
        network.arm_bias.normal_(0.0, 2.0)
    return network.eval()


def chains(catalog, include_default: bool) -> list[list[int]]:
    out = []
    for model in catalog.model_names:
        budgets = [b for b in catalog.budgets_of(model) if b != DEFAULT_BUDGET]
        if include_default and DEFAULT_BUDGET in catalog.budgets_of(model):
            budgets.append(DEFAULT_BUDGET)
        out.append([catalog.arm_of(model, b) for b in budgets])
    return out


def test_one_forward_pass_gives_every_arm():
    catalog = small_catalog()
    network = random_network(catalog, "none", seed=0)
    quality_logits, log_tokens = network(torch.randn(5, 8))
    assert quality_logits.shape == log_tokens.shape == (5, catalog.n_arms)
    # arms differ for the same query: the arm side really conditions the output
    assert quality_logits[0].std() > 0 and log_tokens[0].std() > 0


def test_arm_features_carry_model_budget_and_prices():
    catalog = mixed_catalog()
    arms = arm_table(catalog)
    assert arms.model_index.tolist() == [0, 0, 0, 0, 1, 1, 1]
    # budget values across the catalogue: 10 20 50 100 400 1000 default
    assert arms.budget_index.tolist() == [0, 3, 5, 6, 1, 2, 4]
    assert arms.features.shape == (7, 5)
    np.testing.assert_allclose(arms.features.mean(axis=0), 0.0, atol=1e-6)
    assert arms.features[3, 1] > 0 and arms.features[0, 1] < 0  # the default flag


def test_budget_chain_follows_each_models_budgets():
    catalog = mixed_catalog()
    chain, first = budget_chain(catalog, "budgets")
    # model a: 10 → 100 → 1000 chained, default free; model b: 20 → 50 → 400
    assert chain[2].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert not chain[3].any()
    assert chain[6].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert first.tolist() == [True, False, False, False, True, False, False]
    with_default, _ = budget_chain(catalog, "budgets+default")
    assert with_default[3].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert not budget_chain(catalog, "none")[0].any()
    with pytest.raises(ValueError, match="monotone"):
        budget_chain(catalog, "sometimes")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_monotone_head_never_lowers_quality_as_the_budget_grows(seed, scale):
    catalog = mixed_catalog()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)) * scale
    for monotone, include_default in (("budgets", False), ("budgets+default", True)):
        with torch.no_grad():
            q = torch.sigmoid(random_network(catalog, monotone, seed)(x)[0]).numpy()
        for arms in chains(catalog, include_default):
            assert (np.diff(q[:, arms], axis=1) >= -1e-6).all()


def test_the_same_falling_raw_outputs_fall_only_without_the_monotone_head():
    catalog = mixed_catalog()
    falling = torch.tensor([[3.0, 0.0, -3.0, -6.0, 2.0, 0.0, -2.0]])  # raw, per arm
    q = {m: torch.sigmoid(random_network(catalog, m, 0).monotone_logits(falling))[0].numpy()
         for m in ("none", "budgets", "budgets+default")}
    a_numeric, a_default = [0, 1, 2], catalog.arm_of("a", DEFAULT_BUDGET)
    assert (np.diff(q["none"][a_numeric]) < 0).all()
    assert (np.diff(q["budgets"][a_numeric]) >= 0).all()
    assert q["budgets"][a_default] < q["budgets"][2]          # default left free
    assert q["budgets+default"][a_default] >= q["budgets+default"][2]


def test_chain_bias_starts_the_monotone_head_at_the_arm_means():
    catalog = mixed_catalog()
    chain, first = budget_chain(catalog, "budgets")
    target = np.array([-1.0, 0.5, 0.2, 0.3, 0.0, 1.0, 2.0], dtype=np.float32)
    network = random_network(catalog, "budgets", seed=0)
    with torch.no_grad():
        network.arm_bias[0] = torch.as_tensor(chain_bias(target, chain, first))
        logits = network.monotone_logits(torch.zeros(1, 7) + network.arm_bias[0]).numpy()[0]
    # rising targets are met; the dip at a/1000 (0.2 after 0.5) becomes a minimal step up
    np.testing.assert_allclose(logits[[0, 1, 3, 4, 5, 6]], target[[0, 1, 3, 4, 5, 6]], atol=1e-5)
    assert 0.5 < logits[2] < 0.6


def test_a_trained_monotone_predictor_keeps_the_property():
    catalog = small_catalog()
    train, _ = planted_arrays(catalog, n_queries=300, dim=16, seed=0)
    test, _ = planted_arrays(catalog, n_queries=100, dim=16, seed=5)
    predictor = make_predictor("r2ray", monotone="budgets", epochs=4).fit(train, catalog)
    quality = predictor.predict(test.embedding).quality
    for arms in chains(catalog, include_default=False):
        assert (np.diff(quality[:, arms], axis=1) >= -1e-6).all()
