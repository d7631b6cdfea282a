"""The shared decision path's caps and prices: every arm is sent with a finite ``max_tokens``."""

import numpy as np
import pytest

from r2ray.catalog import DEFAULT_BUDGET, catalog_from_dict, load_catalog
from r2ray.prompting import estimate_tokens, instruction_tokens_bound, max_tokens_for
from r2ray.routing import arm_caps, arm_scores, call_cost_usd, routed_request, worst_case_usd


def test_a_default_arm_is_sent_with_the_output_cap_never_the_context():
    catalog = load_catalog()
    glm = catalog.arm_of("GLM-4.6", DEFAULT_BUDGET)             # 202,752-token context
    assert routed_request("Why?", glm, catalog, 12)["max_tokens"] == 4000
    math = catalog.arm_of("Qwen2.5-Math-1.5B-Instruct", DEFAULT_BUDGET)   # 4,096-token context
    assert routed_request("Why?", math, catalog, 1000)["max_tokens"] == 3096
    budgeted = catalog.arm_of("GLM-4.6", 200)
    assert routed_request("Why?", budgeted, catalog, 12)["max_tokens"] == 220


def test_caps_of_every_arm_are_the_scalar_rule_and_the_catalogues_cap():
    catalog = catalog_from_dict({"budgets": [10, 80, 4000, "default"], "models": [
        {"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096},
        {"name": "b", "input_per_m": 1, "output_per_m": 2, "context": 131072,
         "max_output_tokens": 1500}]})
    input_tokens = np.array([1, 500, 4095, 100_000])
    caps = arm_caps(catalog, input_tokens)
    assert caps.shape == (4, catalog.n_arms) and caps.dtype == np.int64
    for i, n_in in enumerate(input_tokens):
        for k, (model, budget) in enumerate(catalog.arms):
            spec = catalog.model(model)
            assert caps[i, k] == max_tokens_for(budget, spec.context, int(n_in),
                                                spec.output_cap_tokens)
            assert caps[i, k] == routed_request("q", k, catalog, int(n_in))["max_tokens"]
    # a, 4000: 4096 − 1 − 43 (the length instruction's UTF-8 bytes: the prompt sent carries it;
    # before, 4095, and a prompt of exact input tokens plus the instruction overflowed the window)
    assert list(caps[0]) == [18, 88, 4052, 4000, 18, 88, 4400, 1500]
    assert caps[2, 3] == 1 and caps[3, 7] == 1500   # never beyond what the context leaves
    instruction = instruction_tokens_bound(catalog.arm_arrays["budget_tokens"])
    context = catalog.arm_arrays["context_tokens"]
    fits = caps > 1   # a prompt that leaves room: input + instruction + cap within the window
    assert np.all((input_tokens[:, None] + instruction[None, :] + caps <= context[None, :])[fits])


def test_worst_case_is_the_prompt_sent_plus_the_cap_at_the_output_price():
    catalog = catalog_from_dict({"budgets": [100, "default"], "models": [
        {"name": "a", "input_per_m": 0.5, "output_per_m": 2.0, "context": 8192,
         "max_output_tokens": 3000}]})
    worst = worst_case_usd(catalog, np.array([10, 6000]))
    assert worst.dtype == np.float64
    instruction = 42   # UTF-8 bytes of "\n\nAnswer concisely, in at most 100 tokens."
    np.testing.assert_allclose(worst, np.array([
        [(10 + instruction) * 0.5 + 110 * 2.0, 10 * 0.5 + 3000 * 2.0],
        [(6000 + instruction) * 0.5 + 110 * 2.0, 6000 * 0.5 + 2192 * 2.0]]) * 1e-6, rtol=1e-15)
    assert worst_case_usd(catalog, np.zeros(0, np.int64)).shape == (0, 2)
    caps = np.array([[7, 9], [11, 13]])
    np.testing.assert_allclose(worst_case_usd(catalog, np.array([10, 6000]), caps), np.array([
        [(10 + instruction) * 0.5 + 7 * 2.0, 10 * 0.5 + 9 * 2.0],
        [(6000 + instruction) * 0.5 + 11 * 2.0, 6000 * 0.5 + 13 * 2.0]]) * 1e-6, rtol=1e-15)


def test_worst_case_bounds_the_bill_of_the_prompt_actually_sent():
    """Given input tokens that bound the query (its UTF-8 bytes), the worst case bounds the bill
    at the cap of the prompt sent, length instruction included. Before the fix it priced the
    query alone: "What is 2+2?" is 7 SmolLM2 tokens, 21 with the budget-10 instruction, and
    its bill at the cap (21 + 18 tokens at $1/M each) was 56 % above the worst case (7 + 18)."""
    catalog = catalog_from_dict({"budgets": [10, 100, 4000, "default"], "models": [
        {"name": "a", "input_per_m": 1.0, "output_per_m": 1.0, "context": 8192},
        {"name": "b", "input_per_m": 3.0, "output_per_m": 0.5, "context": 4096}]})
    for query in ("What is 2+2?", "量子计算的基本原理", "x"):
        given = len(query.encode())
        worst = worst_case_usd(catalog, np.array([given]))[0]
        for arm, (model, _) in enumerate(catalog.arms):
            request = routed_request(query, arm, catalog, given)
            sent = sum(len(m["content"].encode()) for m in request["messages"])
            bill = catalog.cost_usd(model, sent, request["max_tokens"])
            assert bill <= worst[arm] * (1 + 1e-12), (query, catalog.arms[arm], bill, worst[arm])


def test_c_hat_prices_the_prompt_sent_with_its_length_instruction():
    # before the fix: ĉ priced the query's tokens only, while a budgeted arm's call also sends
    # the instruction (~11 tokens): a fifth of ĉ on a 10-token arm of a short query here
    catalog = load_catalog()
    queries = ["What is 2 + 2?", "Name three primes.", "Explain entropy in one paragraph."]
    input_tokens = np.array([estimate_tokens(q) for q in queries])
    t_hat = np.full((len(queries), catalog.n_arms), 40.0, np.float32)
    scores = arm_scores(np.full_like(t_hat, 0.5), t_hat, catalog, input_tokens)
    price_in = catalog.arm_arrays["price_in_usd"]
    for i, query in enumerate(queries):
        for arm in range(catalog.n_arms):
            request = routed_request(query, arm, catalog, int(input_tokens[i]))
            sent = estimate_tokens(request["messages"][-1]["content"])
            bill = catalog.cost_usd(request["model"], sent, 40.0)
            # the estimate of the whole prompt is not additive in its parts by a token or two
            assert abs(scores.cost_usd[i, arm] - bill) <= 2 * price_in[arm] + 1e-18, \
                (query, catalog.arms[arm])
            assert sent - input_tokens[i] >= (9 if request["budget"] else 0)
    query_only = catalog.arm_cost_usd(input_tokens, t_hat)
    budgeted = catalog.arm_arrays["budget_tokens"] != DEFAULT_BUDGET
    assert np.allclose(scores.cost_usd - query_only, np.where(budgeted, 11 * price_in, 0.0),
                       rtol=1e-9, atol=0)


def test_the_cost_of_each_rows_own_arm_is_its_cell_of_every_arms_cost():
    # one formula for both shapes: the bench's bill of a row with no cost_usd, the strict
    # solve's ĉ of a chosen arm and the benchmark's realised cost index it by each row's arm
    catalog = load_catalog()
    rng = np.random.default_rng(0)
    input_tokens = rng.integers(1, 5000, 40)
    output_tokens = rng.integers(0, 4000, (40, catalog.n_arms)).astype(np.float32)
    arm = rng.integers(0, catalog.n_arms, 40)
    rows = np.arange(40)
    every = call_cost_usd(catalog, input_tokens, output_tokens)
    own = call_cost_usd(catalog, input_tokens, output_tokens[rows, arm], arm)
    assert own.dtype == np.float64 and own.shape == (40,)
    assert np.array_equal(own, every[rows, arm])
    budgeted = catalog.arm_arrays["budget_tokens"][arm] != DEFAULT_BUDGET
    assert budgeted.any() and (~budgeted).any()
    query_only = catalog.arm_cost_usd(input_tokens, output_tokens)[rows, arm]
    assert np.array_equal(own[~budgeted], query_only[~budgeted])   # the default arm: no instruction
    assert (own[budgeted] > query_only[budgeted]).all()


def test_cost_factors_must_be_one_finite_positive_factor_per_arm():
    # before the fix: NaN masked the arm as unusable, -1 made its cost negative, [2.0] was
    # broadcast to every arm
    catalog = catalog_from_dict({"budgets": [100, "default"], "models": [
        {"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096}]})
    quality, tokens = np.full((1, 2), 0.5, np.float32), np.full((1, 2), 50, np.float32)
    scores = arm_scores(quality, tokens, catalog, np.array([10]), cost_factors=[2.0, 1.0])
    # budget 100: 10 query + 11 instruction tokens at $1/M, 50 out at $2/M
    assert scores.cost_usd[0].tolist() == pytest.approx([2 * 121e-6, 110e-6])
    for factors, match in (([np.nan, 1.0], r"cost_factors\[0\] \(a, budget 100\) is nan"),
                           ([1.0, -1.0], r"cost_factors\[1\] \(a, budget 0\) is -1"),
                           ([1.0, np.inf], "finite and positive"), ([2.0], "2 arms")):
        with pytest.raises(ValueError, match=match):
            arm_scores(quality, tokens, catalog, np.array([10]), cost_factors=factors)


def test_a_usable_arm_leaves_room_for_the_instruction_and_its_budget():
    """An arm the context check lets a prompt use is sent whole: input tokens + the length
    instruction's bound + ``max_tokens`` fit the window, and the cap is at least the budget.
    Before the fix the check left the instruction out: a 4,086-token prompt kept the budget-10
    arm of a 4,096-token model, sent with a cap of 1 and a prompt (with its ~14-token
    instruction) past the window; at 4,050 tokens its cap of 5 cut the 10-token answer."""
    catalog = catalog_from_dict({"budgets": [1, 10, 100, 4000, "default"], "models": [
        {"name": "a", "input_per_m": 1, "output_per_m": 2, "context": 4096}]})
    input_tokens = np.arange(1, 4097)
    fits = arm_scores(np.full((4096, 5), 0.5), np.full((4096, 5), 10.0), catalog,
                      input_tokens).cost_usd
    fits = np.isfinite(fits)
    caps = arm_caps(catalog, input_tokens)
    budgets = catalog.arm_arrays["budget_tokens"]
    sent = input_tokens[:, None] + instruction_tokens_bound(budgets)[None, :] + caps
    assert np.all((sent <= 4096)[fits]) and np.all((caps >= np.maximum(budgets, 1))[fits])
    ten = catalog.arm_of("a", 10)
    longest = 4096 - 41 - 10   # the longest prompt it takes: 41 instruction bytes at b = 10
    assert fits[longest - 1, ten] and not fits[longest, ten]   # row i: i + 1 input tokens
    assert fits[4094, catalog.arm_of("a", DEFAULT_BUDGET)]   # no instruction: one token left
