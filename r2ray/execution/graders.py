"""Graders: a response and a reference → quality in [0, 1]. Pure functions, one registry.

``exact`` (normalised string match, also against the text after a final "answer:" and the
last ``\\boxed{..}``),
``choice`` (the multiple-choice letter the response commits to), ``numeric`` / ``math``
(math-verify's parser and checker: numbers, fractions, LaTeX, units) — and ``judge``, an LLM
through any OpenAI-compatible endpoint: :func:`judge_messages` asks it for a score with a rubric,
:func:`parse_judge_score` reads one back (None: the judge gave none — a failure, never a 0).
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Callable
from decimal import Decimal

from r2ray.bench.answers import boxed_answers
from r2ray.errors import R2RayError

_ANSWER = re.compile(r"(?:final answer|answer)\**\s*(?:is|:|=)\s*(.+)$", re.IGNORECASE | re.DOTALL)
_STATED = [   # the last one stated is the final answer ("answer: A is wrong ... Answer: C")
    re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?([A-Ja-j])\)?\s*\}"),
    # a lowercase letter only as an option ("answer: b)", "the answer is c."), never the
    # article; "I" never as the pronoun ("Answer: I think it is B", "answer: I'd say C");
    # the label may be bold ("**Answer:** C", "**Answer**: C")
    re.compile(r"(?i:answer)\**\s*(?i:is\s*:?|:)?\**\s*\(?\**([A-HJ]|I(?!['’]|[ \t]+[a-z])"
               r"|[a-j](?=\**\)|\**[.:;,]?\s*$))\**\)?(?![A-Za-z])"),
]
_MENTIONED = [   # else the first letter the answer opens with or names as an option
    re.compile(r"^\s*\(?\**([A-J])\**[\)\.:](?![A-Za-z])"),
    re.compile(r"^\s*\(?\**([A-Ja-j])\**\)?\.?\s*(?:\n|$)"),   # a line of its own: "**B**", "b"
    re.compile(r"\(([A-J])\)"),
    re.compile(r"(?<![A-Za-z])([A-J])\)"),
]
_SCORE = re.compile(   # also JSON ('"score": 0.8'); not the "1" of "10", "1/10", "1 out of 10"
    # ("x/1" is x) nor of "1e-1", nor the "0" of a decimal comma ("0,5")
    r"score[\"']?\s*[:=]?\s*\**[\"']?\s*([01](?:\.\d+)?|\.\d+)"
    r"(?!\d|[.,]\d|[eE][-+]?\d|\s*(?:/|out\s+of)(?!\s*1\b))", re.IGNORECASE)
_E_NOTATION = re.compile(r"(?<![\w.])(?:\d+(?:\.\d+)?|\.\d+)[eE][-+]?\d{1,3}(?!\w|\.\d)")
_FULL_WIDTH = {0xFF01 + i: 0x21 + i for i in range(94)} | {0x3000: 0x20}   # "４２" -> "42"
_MINUS = {0x2212: 0x2D}   # "−5" -> "-5": the minus sign, which NFKC keeps and math-verify skips

_STRIP = string.punctuation + " “”‘’"


class GraderError(R2RayError, ValueError):
    pass


def normalise(text: str) -> str:
    """NFKC (full-width digits, ligatures, composed accents as one form), lower case, single
    spaces, no surrounding punctuation or quotes."""
    text = " ".join(unicodedata.normalize("NFKC", str(text)).translate(_MINUS).lower().split())
    core = text.strip(_STRIP)
    lead = text[: len(text) - len(text.lstrip(_STRIP))]
    return "-" + core if lead.endswith("-") and core[:1].isdigit() else core   # keep a sign


def grade_exact(response: str, reference: str) -> float:
    want = normalise(reference)
    candidates = [response]
    found = _ANSWER.search(response)
    if found:
        candidates.append(found.group(1).splitlines()[0])
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if lines:
        candidates.append(lines[-1])
    candidates += boxed_answers(response)[-1:]   # "\\boxed{Paris}": the last box, unwrapped
    return float(any(normalise(c) == want for c in candidates))


def choice_letter(response: str) -> str | None:
    """The letter a response commits to (A–J), or None."""
    text = response.strip()
    for pattern in _STATED:
        stated = pattern.findall(text)
        if stated:
            return stated[-1].upper()
    for pattern in _MENTIONED:
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    return None


def grade_choice(response: str, reference: str) -> float:
    want = choice_letter(reference) or normalise(reference).upper()
    return float(choice_letter(response) == want)


def grade_numeric(response: str, reference: str) -> float:
    """math-verify: the response's final answer equals the reference (numbers, fractions,
    expressions, LaTeX). No signal timeouts: graders run in worker threads."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise GraderError("the numeric and math graders need math-verify: pip install "
                          "'math-verify>=0.9' (in r2ray's dev extra)") from None

    logging.getLogger("math_verify").setLevel(logging.ERROR)   # "timeout is disabled", per call
    gold, answer = _math_parse(reference, parse), _math_parse(response, parse)
    if not gold or not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=None))


def _math_parse(text: str, parse: Callable) -> list:
    """math-verify's reading of ``text``; bare LaTeX (``\\dfrac{3}{4}``, ``\\sqrt{2}``, the form
    MATH references take) read as if between ``$``: math-verify reads LaTeX only in delimiters."""
    plain = _plain_numbers(text)
    return parse(plain, parsing_timeout=None) or parse(f"${plain}$", parsing_timeout=None)


def _plain_numbers(text: str) -> str:
    """Full-width characters and the minus sign as ASCII and ``4.2e1`` as ``42``: math-verify
    reads none of them (it takes e-notation's mantissa, 4.2; no number in ``−5``). Not NFKC,
    which would make ``5²`` the number 52."""
    return _E_NOTATION.sub(lambda m: format(Decimal(m.group(0)), "f"),
                           str(text).translate(_FULL_WIDTH | _MINUS))


GRADERS: dict[str, Callable[[str, str], float]] = {
    "exact": grade_exact, "choice": grade_choice, "numeric": grade_numeric, "math": grade_numeric,
}
GRADER_NAMES = [*GRADERS, "judge"]


def grade(grader: str, response: str, reference: str) -> float:
    try:
        return GRADERS[grader](response, reference)
    except KeyError:
        raise GraderError(f"unknown grader {grader!r}; use one of {GRADER_NAMES}") from None


JUDGE_RUBRIC = """You are grading an answer to a question. Rate how correct and useful the answer is.
1.0: fully correct and answers the question. 0.5: partly correct or incomplete.
0.0: wrong, off-topic or empty. A reference answer, when given, is correct.
Reply with one line: "Score: X" where X is a number between 0 and 1."""


def judge_messages(query: str, response: str, reference: str | None) -> list[dict[str, str]]:
    parts = [f"Question:\n{query}"]
    if reference:
        parts.append(f"Reference answer:\n{reference}")
    parts.append(f"Answer to grade:\n{response}")
    return [{"role": "system", "content": JUDGE_RUBRIC},
            {"role": "user", "content": "\n\n".join(parts) + "\n\nScore:"}]


def parse_judge_score(text: str) -> float | None:
    """The score in [0, 1] from a judge's reply: "Score: X", else a lone number; None if none."""
    found = _SCORE.search(text or "")
    if found is None:
        found = re.match(r"^\s*([01](?:\.\d+)?|\.\d+)\s*$", text or "")
    if found is None:
        return None
    value = float(found.group(1))
    return value if 0.0 <= value <= 1.0 else None


def agreement(judge: list[float], exact: list[float], threshold: float = 0.5) -> dict:
    """How often the judge (score ≥ threshold) agrees with a reference grader (1 = correct)."""
    pairs = list(zip(judge, exact))
    if not pairs:
        return {"rows": 0, "agreement": None, "mean_abs_diff": None}
    agree = sum((j >= threshold) == (e >= 0.5) for j, e in pairs) / len(pairs)
    return {"rows": len(pairs), "agreement": round(agree, 4),
            "mean_abs_diff": round(sum(abs(j - e) for j, e in pairs) / len(pairs), 4)}
