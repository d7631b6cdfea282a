"""The synthetic world's hidden truth: topics, model traits, and how answers come out.

Pure numpy over blocks of queries; no I/O. Knobs live in :data:`TOPICS` (one row per topic)
and :class:`Knobs` (everything else), each with the observed fact it reproduces in
``docs/synthetic_world.md``.

A query has a topic, a difficulty d in [0, 1] (most queries easy), a *needed length* L (tokens a
complete answer takes) and a small latent vector z (which models suit it beyond topic). A model has
a skill per topic (keyed off its size and specialty, parsed from the catalogue name), a verbosity,
a length-noise spread and a compliance logit. For arm (model m, budget b), the answer:

* default (b = 0): the model's natural length N = median × exp(σ_m ξ);
* budgeted: with probability π(m, b) the model obeys (writes about ``obey_target`` × b, or N if
  shorter), else it ignores the instruction (writes ``disobey_shrink`` × N);

either way the hard cap of ``r2ray.prompting.max_tokens_array`` (the one the router sends: the
model's output cap for the default arm) cuts it, and a cut answer is ``truncated``.

Quality given length T: capability p(m, query) × sufficiency(T / L) × overthinking(T / L)
× (truncation_keep if cut). The answer-length noise ξ is stratified: each query holds a hidden
offset o, and ξ for (query, model) is one of ``Knobs.grid`` equiprobable normal quantiles
Φ⁻¹((g·S + o + ½) / (G·S)), g uniform. So across queries ξ is (finely) N(0, 1), while the *truth*
(expected label and expected output tokens per arm, given the hidden features) is an exact
finite sum over the query's G nodes and the two obey branches.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from r2ray.catalog import Catalog
from r2ray.prompting import max_tokens_array


class Topic(NamedTuple):
    name: str
    share: float             # of all queries
    judged: str              # "binary" (0/1: exact match, unit tests) or "graded" (0.0, 0.1, ..., 1.0)
    difficulty: float        # mean difficulty in [0, 1]
    needed_tokens: float     # median needed length at mean difficulty (tokens)
    default_tokens: float    # median default answer of a plain model (tokens)
    short_floor: float       # share of quality an answer far shorter than needed still earns
    truncation_keep: float   # share of quality kept when the hard cap cuts the answer
    guess: float             # quality floor of a wrong-but-trying answer (multiple choice, partial credit)
    size_sensitivity: float  # how strongly skill on this topic grows with model size


TOPICS: tuple[Topic, ...] = (
    Topic("math",      0.16, "binary", 0.42, 220, 450, 0.08, 0.15, 0.00, 1.3),
    Topic("code",      0.14, "binary", 0.40, 260, 550, 0.02, 0.20, 0.00, 1.2),
    Topic("science",   0.12, "binary", 0.32,  60, 320, 0.35, 0.60, 0.25, 1.0),
    Topic("factual",   0.16, "binary", 0.25,  12, 180, 0.55, 0.85, 0.00, 1.1),
    Topic("reasoning", 0.12, "binary", 0.38, 120, 400, 0.15, 0.20, 0.00, 1.2),
    Topic("writing",   0.10, "graded", 0.28, 260, 600, 0.15, 0.50, 0.10, 0.7),
    Topic("advice",    0.10, "graded", 0.22, 150, 500, 0.25, 0.60, 0.10, 0.6),
    Topic("business",  0.10, "graded", 0.30, 180, 450, 0.20, 0.50, 0.10, 0.8),
)
TOPIC_NAMES = [t.name for t in TOPICS]


@dataclass(frozen=True)
class Knobs:
    """Every other setting of the world, with its default. Units in names; see the docs."""

    easy_share: float = 0.35                # queries drawn from the trivial pool: d ~ Beta(1, easy_beta)
    easy_beta: float = 20.0
    difficulty_concentration: float = 3.5   # others: Beta(mean·c, (1−mean)·c) per topic
    needed_difficulty_slope: float = 1.5    # log needed length per unit difficulty
    needed_sigma: float = 0.5               # log-normal spread of needed length at fixed difficulty
    latent_dims: int = 4                    # per-query latent z; per-model weights w
    latent_weight: float = 0.08             # skill shift per unit z·w
    skill_base: float = 0.33                # skill of a 1B model on a size-neutral topic
    skill_per_decade: float = 0.15          # skill gained per 10× parameters
    skill_jitter: float = 0.03              # per (model, topic), from the model name hash
    specialist_bonus: float = 0.30          # on the specialty topic (math, code)
    specialist_penalty: float = 0.10        # on every other topic
    capability_sharpness: float = 9.0       # κ in p = sigmoid(κ (skill − difficulty))
    verbosity_sigma: float = 0.25           # per-model verbosity spread (log), from the name hash
    reasoning_verbosity: float = 1.6        # verbosity of reasoning-style families (Qwen3, GLM)
    length_sigma: float = 0.55              # log-normal spread of a model's answer length
    length_sigma_small: float = 0.20        # extra spread for the smallest models
    compliance_center_b: float = 8.0        # size (billions) obeying a 10-token budget half the time
    compliance_per_doubling: float = 2.0    # logit per doubling of size
    compliance_per_budget_doubling: float = 0.5  # logit per doubling of the budget
    obey_target: float = 0.85               # an obeying model writes this × budget (median)
    obey_sigma: float = 0.20                # log spread of that, tied to the same noise ξ
    disobey_shrink: float = 0.70            # an ignoring model still shortens its answer a little
    overthinking_per_doubling: float = 0.03  # quality lost per doubling of length past 4 × needed
    overthinking_floor: float = 0.85
    grid: int = 16                          # G: quantile nodes of the length noise ξ per query
    grid_offsets: int = 64                  # S: per-query offsets of those nodes (G·S quantiles)


KNOBS = Knobs()

# Sizes (billions of parameters) for families whose names carry none; rough public figures —
# only their order matters.
KNOWN_SIZES_B = {
    "glm-4.5-air": 106, "glm-4.6": 355, "glm-4.5": 355, "gpt-4o-mini": 8, "gpt-4o": 200,
    "claude-3-haiku": 20, "claude": 200, "gemini-2.0-flash": 80, "gemini-2.5-flash-lite": 40,
    "gemini-2.5-flash": 100, "gemini-2.5-pro": 500, "mistral-large": 123, "mistral-small": 24,
    "deepseek": 671,
}
REASONING_FAMILIES = ("qwen3", "glm-4.5", "glm-4.6", "deepseek-r1", "qwq", "thinking", "reasoning")
_SIZE_RE = re.compile(r"(?<![A-Za-z\d.])(\d+(?:\.\d+)?)[bB](?![A-Za-z])")
_MOE_RE = re.compile(r"(\d+)x(\d+(?:\.\d+)?)[bB](?![A-Za-z])")


def model_size_b(name: str, output_per_m: float) -> float:
    """Parameters in billions: parsed from the name ("0.6B", "70B", "8x7B", total for MoE "235B-A22B"),
    else a table of known families, else guessed from the output price (50B per USD/M tokens)."""
    moe = _MOE_RE.search(name)
    if moe:
        return float(moe.group(1)) * float(moe.group(2))
    sized = _SIZE_RE.search(name)
    if sized:
        return float(sized.group(1))
    lower = name.lower()
    for family, size in KNOWN_SIZES_B.items():  # specific keys precede their prefixes
        if family in lower:
            return float(size)
    return float(np.clip(50.0 * output_per_m, 0.5, 1000.0)) if output_per_m > 0 else 7.0


def model_specialty(name: str) -> str | None:
    lower = name.lower()
    if "math" in lower:
        return "math"
    if "coder" in lower or "code" in lower:
        return "code"
    return None


def _name_rng(name: str) -> np.random.Generator:
    """Per-model randomness from the name alone: the same model behaves alike in every world."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


@dataclass(frozen=True)
class ModelTraits:
    """Hidden per-model arrays, [M] or [M, T] in catalogue order."""

    names: list[str]
    size_b: np.ndarray            # [M] billions of parameters
    skill: np.ndarray             # [M, T] skill per topic (compared against difficulty)
    latent: np.ndarray            # [M, latent_dims] weights on the query latent z
    verbosity: np.ndarray         # [M] multiplier on the topic's default answer length
    length_sigma: np.ndarray      # [M] log spread of answer length
    compliance_logit: np.ndarray  # [M] logit of obeying a 10-token budget
    context: np.ndarray           # [M] context window, tokens
    output_cap: np.ndarray        # [M] default arm's output cap (catalogue), tokens


def model_traits(catalog: Catalog, knobs: Knobs = KNOBS) -> ModelTraits:
    rows = [_one_model(m.name, m.output_per_m, knobs) for m in catalog.models]
    return ModelTraits(
        names=catalog.model_names,
        size_b=np.array([r["size_b"] for r in rows]),
        skill=np.stack([r["skill"] for r in rows]),
        latent=np.stack([r["latent"] for r in rows]),
        verbosity=np.array([r["verbosity"] for r in rows]),
        length_sigma=np.array([r["length_sigma"] for r in rows]),
        compliance_logit=np.array([r["compliance_logit"] for r in rows]),
        context=np.array([m.context for m in catalog.models], dtype=np.float64),
        output_cap=np.array([m.output_cap_tokens for m in catalog.models], dtype=np.float64),
    )


def _one_model(name: str, output_per_m: float, knobs: Knobs) -> dict:
    rng = _name_rng(name)
    size_b = model_size_b(name, output_per_m)
    decades = math.log10(size_b)
    sensitivity = np.array([t.size_sensitivity for t in TOPICS])
    skill = (knobs.skill_base + knobs.skill_per_decade * sensitivity * decades
             + knobs.skill_jitter * rng.standard_normal(len(TOPICS)))
    specialty = model_specialty(name)
    if specialty is not None:
        on_topic = np.array([t.name == specialty for t in TOPICS])
        skill = skill + np.where(on_topic, knobs.specialist_bonus, -knobs.specialist_penalty)
    reasoning = any(family in name.lower() for family in REASONING_FAMILIES)
    smallness = float(np.clip((math.log10(8.0) - decades) / 1.2, 0.0, 1.0))  # 1 at ≤ 0.5B
    return {
        "size_b": size_b,
        "skill": skill,
        "latent": rng.standard_normal(knobs.latent_dims),
        "verbosity": (knobs.reasoning_verbosity if reasoning else 1.0)
        * math.exp(knobs.verbosity_sigma * rng.standard_normal()),
        "length_sigma": knobs.length_sigma + knobs.length_sigma_small * smallness,
        "compliance_logit": knobs.compliance_per_doubling * math.log2(size_b / knobs.compliance_center_b),
    }


@dataclass(frozen=True)
class QueryFeatures:
    """Hidden per-query truth for a block of n queries."""

    topic: np.ndarray          # [n] int index into TOPICS
    difficulty: np.ndarray     # [n] in [0, 1]
    detail: np.ndarray         # [n] standard normal: how much longer than usual the answer must be
    needed_tokens: np.ndarray  # [n] tokens a complete answer takes
    latent: np.ndarray         # [n, latent_dims]
    length_offset: np.ndarray  # [n] int in [0, grid_offsets): where this query's length nodes sit


def sample_features(rng: np.random.Generator, n: int, knobs: Knobs = KNOBS) -> QueryFeatures:
    shares = np.array([t.share for t in TOPICS])
    topic = rng.choice(len(TOPICS), size=n, p=shares / shares.sum())
    mean = np.array([t.difficulty for t in TOPICS])[topic]
    c = knobs.difficulty_concentration
    easy = rng.random(n) < knobs.easy_share
    difficulty = np.where(easy, rng.beta(1.0, knobs.easy_beta, n), rng.beta(mean * c, (1.0 - mean) * c))
    detail = rng.standard_normal(n)
    needed = (np.array([t.needed_tokens for t in TOPICS])[topic]
              * np.exp(knobs.needed_difficulty_slope * (difficulty - mean) + knobs.needed_sigma * detail))
    latent = rng.standard_normal((n, knobs.latent_dims))
    offset = rng.integers(0, knobs.grid_offsets, size=n)
    return QueryFeatures(topic, difficulty, detail, needed, latent, offset)


def length_grid(knobs: Knobs = KNOBS) -> np.ndarray:
    """[G, S] float32: node g at offset o is the standard-normal quantile (g·S + o + ½) / (G·S)."""
    return _normal_quantiles(knobs.grid, knobs.grid_offsets).copy()


@lru_cache(maxsize=8)
def _normal_quantiles(grid: int, offsets: int) -> np.ndarray:
    unit = NormalDist()
    total = grid * offsets
    return np.array([unit.inv_cdf((i + 0.5) / total) for i in range(total)],
                    dtype=np.float32).reshape(grid, offsets)


@dataclass(frozen=True)
class AnswerSetting:
    """What an answer to (query i, arm k) depends on besides the length noise; float32 arrays
    [n, K] or broadcastable to it."""

    capability: np.ndarray      # [n, K] quality of a complete answer
    needed: np.ndarray          # [n, 1] tokens
    natural_median: np.ndarray  # [n, K] median default length, tokens
    sigma: np.ndarray           # [1, K] log spread of length
    cap: np.ndarray             # [n, K] max_tokens
    budget: np.ndarray          # [1, K] tokens, 0 = default
    obey_prob: np.ndarray       # [1, K] chance the model obeys the instruction (0 for default)
    shrink: np.ndarray          # [1, K] length factor when the instruction is ignored (1 for default)
    short_floor: np.ndarray     # [n, 1]
    truncation_keep: np.ndarray  # [n, 1]
    arm_model: np.ndarray       # [K] model index of each arm
    length_offset: np.ndarray   # [n] int, the query's grid offset


def answer_setting(features: QueryFeatures, input_tokens: np.ndarray, traits: ModelTraits,
                   arm_model: np.ndarray, arm_budget: np.ndarray,
                   knobs: Knobs = KNOBS) -> AnswerSetting:
    topic = features.topic
    column = lambda field: np.array([getattr(t, field) for t in TOPICS])[topic][:, None]  # noqa: E731
    guess = column("guess")
    fit = traits.skill[:, topic].T + knobs.latent_weight * features.latent @ traits.latent.T  # [n, M]
    logit = knobs.capability_sharpness * (fit - features.difficulty[:, None])
    capability = guess + (1.0 - guess) / (1.0 + np.exp(-logit))
    needed = features.needed_tokens[:, None]
    natural = (column("default_tokens") * np.sqrt(needed / column("needed_tokens"))
               * traits.verbosity[None, :])  # [n, M]
    budget = arm_budget.astype(np.float64)
    budgeted = budget > 0
    doublings = np.log2(np.maximum(budget, 1.0) / 10.0)
    obey_logit = traits.compliance_logit[arm_model] + knobs.compliance_per_budget_doubling * doublings
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731  (3× faster; plenty for this)
    return AnswerSetting(
        capability=f32(capability[:, arm_model]),
        needed=f32(needed),
        natural_median=f32(natural[:, arm_model]),
        sigma=f32(traits.length_sigma[arm_model][None, :]),
        cap=f32(max_tokens_array(arm_budget, traits.context[arm_model],
                                 traits.output_cap[arm_model], input_tokens)),
        budget=f32(budget[None, :]),
        obey_prob=f32(np.where(budgeted, 1.0 / (1.0 + np.exp(-obey_logit)), 0.0)[None, :]),
        shrink=f32(np.where(budgeted, knobs.disobey_shrink, 1.0)[None, :]),
        short_floor=f32(column("short_floor")),
        truncation_keep=f32(column("truncation_keep")),
        arm_model=arm_model,
        length_offset=features.length_offset,
    )


def answers(setting: AnswerSetting, xi: np.ndarray | float, obey: np.ndarray | bool,
            knobs: Knobs = KNOBS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(output tokens, expected judged quality, truncated), each [n, K], for length noise ξ and
    the obey decision. Tokens are whole numbers ≥ 1 (as floats)."""
    natural = setting.natural_median * np.exp(setting.sigma * xi)
    return judge(setting, _intended(setting, natural, xi, obey, knobs), knobs)


def _intended(setting: AnswerSetting, natural: np.ndarray, xi: np.ndarray | float,
              obey: np.ndarray | bool, knobs: Knobs) -> np.ndarray:
    """Length the model means to write [n, K], before the hard cap."""
    ignored = natural * setting.shrink
    if obey is False:
        return ignored
    obeyed = np.minimum(natural, setting.budget * (knobs.obey_target * np.exp(knobs.obey_sigma * xi)))
    return obeyed if obey is True else np.where(obey, obeyed, ignored)


def judge(setting: AnswerSetting, intended: np.ndarray,
          knobs: Knobs = KNOBS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cap the intended length and score it: (tokens, expected quality, truncated), [n, K]."""
    s = setting
    truncated = intended > s.cap
    tokens = np.minimum(intended, s.cap)
    np.maximum(np.rint(tokens, out=tokens), 1.0, out=tokens)
    ratio = tokens / s.needed
    shortfall = 1.0 - np.minimum(ratio, 1.0)
    sufficiency = s.short_floor + (1.0 - s.short_floor) * (1.0 - shortfall * shortfall)
    # log2(max(ratio, 4)) − 2 = doublings past 4 × needed
    overthinking = np.maximum(
        1.0 - knobs.overthinking_per_doubling * (np.log2(np.maximum(ratio, 4.0)) - 2.0),
        knobs.overthinking_floor)
    quality = s.capability * sufficiency
    quality *= overthinking
    quality *= np.where(truncated, s.truncation_keep, 1.0)
    return tokens, quality, truncated


def expected_outcomes(setting: AnswerSetting, knobs: Knobs = KNOBS) -> tuple[np.ndarray, np.ndarray]:
    """Exact (expected judged quality, expected output tokens) [n, K]: the mean over the
    query's grid nodes and the two obey branches, the distribution :func:`realise` draws from."""
    quality = np.zeros_like(setting.cap)
    tokens = np.zeros_like(setting.cap)
    p = setting.obey_prob
    for nodes in length_grid(knobs):
        xi = nodes[setting.length_offset][:, None]  # [n, 1]
        natural = setting.natural_median * np.exp(setting.sigma * xi)
        t_ignore, q_ignore, _ = judge(setting, _intended(setting, natural, xi, False, knobs), knobs)
        t_obey, q_obey, _ = judge(setting, _intended(setting, natural, xi, True, knobs), knobs)
        quality += q_ignore + p * (q_obey - q_ignore)
        tokens += t_ignore + p * (t_obey - t_ignore)
    return quality / knobs.grid, tokens / knobs.grid


def realise(setting: AnswerSetting, binary: np.ndarray, rng: np.random.Generator, n_models: int,
            knobs: Knobs = KNOBS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One judged answer per (query, arm): (output tokens int64, label, truncated), [n, K].

    The length noise is drawn once per (query, model) and shared by that model's budgets. Labels
    are 0/1 (Bernoulli) for ``binary`` queries, else a 0–10 rubric score / 10 (Binomial(10, q)):
    both unbiased for the expected quality, so the truth is the label's exact expectation.
    """
    n = setting.cap.shape[0]
    node = rng.integers(0, knobs.grid, size=(n, n_models))
    obey = rng.random(setting.cap.shape) < setting.obey_prob
    xi = length_grid(knobs)[node, setting.length_offset[:, None]][:, setting.arm_model]
    tokens, quality, truncated = answers(setting, xi, obey, knobs)
    passed = rng.random(setting.cap.shape) < quality
    rubric = rng.binomial(10, np.clip(quality.astype(np.float64), 0.0, 1.0)) / 10.0
    label = np.where(binary[:, None], passed.astype(np.float64), rubric)
    return tokens.astype(np.int64), label, truncated
