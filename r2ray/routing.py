"""The one decision path shared by the batch job and the Serve endpoint.

predictions (q̂, t̂ per arm) → costs ĉ = (in_tokens + the length instruction's) × p_in + t̂ × p_out
(USD, :func:`call_cost_usd`) → arms a query cannot use
are masked (NaN) → the batch solve or the online price λ picks an arm → :func:`routed_request`
renders it with the one length-instruction template and its hard ``max_tokens`` cap. At the caps,
an arm costs at most :func:`worst_case_usd`; a strict-budget solve prices arms at that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from r2ray.catalog import DEFAULT_BUDGET, Catalog
from r2ray.prompting import (instruction_tokens_bound, instruction_tokens_estimate,
                             max_tokens_array, max_tokens_for, render_messages)


def query_key(query: str, query_id: str | None = None) -> int:
    """uint64 key hashed by the solver's tie rule: the same in the batch job and online, so a
    query tied at λ* takes the same side in both. From the id when there is one, else the text."""
    text = f"id:{query_id}" if query_id is not None else f"text:{query}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class ArmScores:
    """Per query × arm, in ``catalog.arms`` order; NaN = the arm is not available to the query."""

    quality: np.ndarray        # [N, K] float32 predicted quality q̂
    output_tokens: np.ndarray  # [N, K] float32 predicted output tokens t̂
    cost_usd: np.ndarray       # [N, K] float64 predicted cost ĉ (USD)


def context_fits(catalog: Catalog, input_tokens: np.ndarray) -> np.ndarray:
    """[N, K] bool: the prompt sent (input tokens plus the length instruction's bound,
    :func:`instruction_tokens_bound`) and the arm's budget (at least one token) fit the model's
    context, so a usable arm's ``max_tokens`` is at least its budget and the request fits."""
    context = catalog.arm_arrays["context_tokens"]
    budgets = catalog.arm_arrays["budget_tokens"].astype(np.int64)
    need = np.maximum(budgets, 1) + instruction_tokens_bound(budgets)
    # input <= context - need, not input + need <= context: the sum wraps past int64's max
    return np.asarray(input_tokens, dtype=np.int64)[:, None] <= (context - need)[None, :]


def arm_caps(catalog: Catalog, input_tokens: np.ndarray) -> np.ndarray:
    """[N, K] int64 ``max_tokens`` each arm is sent with for prompts of ``input_tokens`` [N]."""
    arrays = catalog.arm_arrays
    return max_tokens_array(arrays["budget_tokens"], arrays["context_tokens"],
                            arrays["output_cap_tokens"], input_tokens)


def worst_case_usd(catalog: Catalog, input_tokens: np.ndarray,
                   caps: np.ndarray | None = None) -> np.ndarray:
    """[N, K] float64 USD each arm costs at most: the prompt sent (input tokens plus the length
    instruction's bound, :func:`instruction_tokens_bound`) × p_in + ``max_tokens`` × p_out.
    ``caps``: :func:`arm_caps` of the same input tokens, where the caller has them already."""
    arrays = catalog.arm_arrays
    caps = arm_caps(catalog, input_tokens) if caps is None else caps
    instruction_usd = instruction_tokens_bound(arrays["budget_tokens"]) * arrays["price_in_usd"]
    return catalog.arm_cost_usd(input_tokens, caps) + instruction_usd[None, :]


def call_cost_usd(catalog: Catalog, input_tokens: np.ndarray, output_tokens: np.ndarray,
                  arm: np.ndarray | None = None) -> np.ndarray:
    """[N, K] float64 USD of each arm's call for queries of ``input_tokens`` [N] (the query's
    own) answered in ``output_tokens`` [N, K]: the prompt sent, the query plus the length
    instruction a budgeted arm appends (:func:`instruction_tokens_estimate`), × p_in, + output ×
    p_out. ĉ prices predicted tokens with it and the synthetic world bills its outcomes with it:
    without the instruction ĉ ran a median 3 % and up to a fifth under the bill of a budgeted
    call of the default pool. With ``arm`` [R] (each row's arm), [R] USD of rows of
    ``input_tokens`` [R] and ``output_tokens`` [R] each called at its arm: a bench row's bill
    where it recorded none, the strict solve's ĉ of a chosen arm."""
    arrays = catalog.arm_arrays
    price_in, price_out = arrays["price_in_usd"], arrays["price_out_usd"]
    instruction_usd = instruction_cost_usd(catalog)
    input_tokens = np.asarray(input_tokens, dtype=np.float64)
    if arm is None:   # every arm: [N, 1] against [K]
        input_tokens = input_tokens[:, None]
    else:             # each row's own arm: [R] against [R]
        price_in, price_out, instruction_usd = price_in[arm], price_out[arm], instruction_usd[arm]
    return (input_tokens * price_in + np.asarray(output_tokens, dtype=np.float64) * price_out
            + instruction_usd)


def instruction_cost_usd(catalog: Catalog) -> np.ndarray:
    """[K] float64 USD the length instruction adds to each arm's call: its estimated tokens ×
    p_in (0 for the default arm)."""
    arrays = catalog.arm_arrays
    return instruction_tokens_estimate(arrays["budget_tokens"]) * arrays["price_in_usd"]


def arm_scores(quality: np.ndarray, output_tokens: np.ndarray, catalog: Catalog,
               input_tokens: np.ndarray, allowed: np.ndarray | None = None,
               cost_factors: np.ndarray | None = None) -> ArmScores:
    """Costs from predictions, with unusable arms (context, NaN, ``allowed`` [N, K] or [K]) masked.

    ``cost_factors`` [K]: per-arm multipliers on ĉ from the latest reconciliation of real bills
    (:mod:`r2ray.reconcile`), the same in the batch job and online; None = 1."""
    cost = call_cost_usd(catalog, input_tokens, output_tokens)
    if cost_factors is not None:
        cost = cost * checked_cost_factors(cost_factors, catalog)[None, :]
    usable = context_fits(catalog, input_tokens) & np.isfinite(quality) & np.isfinite(cost)
    if allowed is not None:   # in place: a shape that does not broadcast to [N, K] is an error
        usable &= allowed     # (np.broadcast_to checked the same: a quarter of a one-row call)
    return ArmScores(np.where(usable, quality, np.nan).astype(np.float32, copy=False),
                     np.where(usable, output_tokens, np.nan).astype(np.float32, copy=False),
                     np.where(usable, cost, np.nan))


def solve_costs(scores: ArmScores, catalog: Catalog, input_tokens: np.ndarray,
                strict_budget: bool = False) -> np.ndarray:
    """[N, K] float64 USD the decision spends per arm: the predicted ĉ, or with ``strict_budget``
    each usable arm's :func:`worst_case_usd` at its cap (masked arms stay NaN). The batch solve
    and Serve's choice at a strict-budget run's λ* both price with this, so they pick alike."""
    if not strict_budget:
        return scores.cost_usd
    return np.where(np.isnan(scores.cost_usd), np.nan, worst_case_usd(catalog, input_tokens))


def checked_cost_factors(cost_factors, catalog: Catalog) -> np.ndarray:
    """``cost_factors`` as float64 [K], refused unless one finite positive factor per arm: a NaN
    would mask its arm as if unusable, a negative one make its cost negative, a single one be
    broadcast to every arm. Checked here, where every caller's factors are applied (K values)."""
    factors = np.asarray(cost_factors, dtype=np.float64)
    if factors.shape != (catalog.n_arms,):
        raise ValueError(f"cost_factors has shape {factors.shape}; the catalogue has "
                         f"{catalog.n_arms} arms, one factor each")
    bad = np.flatnonzero(~(np.isfinite(factors) & (factors > 0)))
    if bad.size:
        model, budget = catalog.arms[int(bad[0])]
        raise ValueError(f"cost_factors[{bad[0]}] ({model}, budget {budget}) is "
                         f"{factors[bad[0]]:g}; a cost factor must be finite and positive")
    return factors


def allowed_arms(catalog: Catalog, models: list[str] | None = None,
                 max_budget_tokens: int | None = None) -> np.ndarray:
    """[K] bool mask for per-request limits: a set of models, a largest numeric budget.

    With ``max_budget_tokens`` the default arm (uncapped length) is excluded too.
    """
    mask = np.ones(catalog.n_arms, dtype=bool)
    if models is not None:
        for name in models:
            catalog.model(name)  # unknown names are an error listing the known ones
        names = np.array([arm.model for arm in catalog.arms])
        mask &= np.isin(names, models)
    if max_budget_tokens is not None:
        budgets = catalog.arm_arrays["budget_tokens"]
        mask &= (budgets != DEFAULT_BUDGET) & (budgets <= max_budget_tokens)
    return mask


def routed_request(query: str, arm: int, catalog: Catalog, input_tokens: int) -> dict:
    """Model, budget, chat messages and the hard ``max_tokens`` cap for one routed query."""
    model, budget_tokens = catalog.arms[arm]
    spec = catalog.model(model)
    return {
        "model": model,
        "budget": int(budget_tokens),
        "messages": render_messages(query, budget_tokens),
        "max_tokens": max_tokens_for(budget_tokens, spec.context, input_tokens,
                                     spec.output_cap_tokens),
    }
