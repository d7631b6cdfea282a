"""Answer extraction and judging for RouterArena rows, used to score answers cut at a token budget.

RouterArena judges each answer with one of these metrics (the kinds present in its cached results).
Extracted answer -> how it is compared with the ground truth:

- ``mcq_accuracy``: first ``\\boxed{..}``, else "answer is X" or a leading ``X.`` / ``**X**``
  -> option letter (a ground truth ``0``-``25`` is an option index);
- ``math_metric``: last ``\\boxed{..}``, right of any ``=`` -> numbers within 1e-6 relative,
  else text without spaces and ``$``;
- ``exact_match``, ``superglue_clozetest``: first box -> lower case, ``_`` as a space (cloze
  also accepts the option letter);
- ``superglue_exact_match``: first box -> label, mapped as RouterArena maps them (``A``/false/0
  is 0.0 and ``B``/true/1 is 1.0; for a yes/no truth ``A`` is yes and ``B`` is no);
- ``chess_accuracy``: first box -> move letters and digits only;
- ``meteor_score``: first box, else the whole text -> RouterArena's METEOR variant;
- ``code_accuracy``: last complete fenced code block -> not runnable here (the tests are not
  shipped): a changed program scores 0.

:func:`capped_quality` keeps the source's own score whenever the cut leaves the extracted answer
unchanged (the judge would see the same answer), so only answers the cut actually changes are
re-judged, and only then can the local judge's differences from RouterArena's matter.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

BOXED = "\\boxed{"
LETTERS = string.ascii_uppercase

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_ANSWER_IS = re.compile(r"answer is\W{0,6}\(?([A-Z])\b")
_LEADING_LETTER = re.compile(r"^\W{0,4}\(?([A-Z])(?:\)|\.|:|\*|$|\s)")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?%?$")


# ---- extraction ------------------------------------------------------------------------------
def boxed_answers(text: str) -> list[str]:
    r"""Contents of every complete ``\boxed{...}`` (braces balanced), unwrapped; an unclosed one
    (an answer cut mid-box) is not an answer."""
    found, start = [], text.find(BOXED)
    while start != -1:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            break
        found.append(_unwrap(text[start + len(BOXED):i - 1]))
        start = text.find(BOXED, i)
    return found


def _unwrap(answer: str) -> str:
    """``{{772}}`` -> ``772``; ``\\text{Yes}`` -> ``Yes``; surrounding ``$`` and spaces dropped."""
    answer = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", answer).strip().strip("$").strip()
    while answer.startswith("{") and answer.endswith("}") and _balanced(answer[1:-1]):
        answer = answer[1:-1].strip()
    return answer


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def code_blocks(text: str) -> list[str]:
    """Complete fenced code blocks (opening and closing ``` both present)."""
    return [block.strip() for block in _FENCE.findall(text)]


def extract_answer(text: str, metric: str) -> str | None:
    """The answer a judge of ``metric`` would read in ``text``; ``None`` when there is none."""
    if metric == "code_accuracy":
        blocks = code_blocks(text)
        return blocks[-1] if blocks else None
    boxed = boxed_answers(text)
    if boxed:
        return boxed[-1] if metric == "math_metric" else boxed[0]
    if metric == "mcq_accuracy":
        plain = text.replace("*", "")
        match = _ANSWER_IS.search(plain) or _LEADING_LETTER.search(plain.strip())
        return match.group(1) if match else None
    if metric == "meteor_score":
        return text.strip() or None
    return None


# ---- judging ---------------------------------------------------------------------------------
def _choice_letter(value: str) -> str | None:
    """``"B"``, ``"b"``, ``"(B) text"``, ``"B. text"`` -> ``B``; index ``"1"`` or ``"1.0"`` too."""
    value = value.strip()
    match = _LEADING_LETTER.match(value.upper() if len(value) == 1 else value)
    if match:
        return match.group(1)
    number = _as_number(value)
    if number is not None and number.is_integer() and 0 <= number < len(LETTERS):
        return LETTERS[int(number)]
    return None


def _as_number(value: str) -> float | None:
    value = value.strip().replace(",", "").replace("\\%", "%").strip("$ ")
    if not _NUMBER.match(value.lower()):
        return None
    return float(value.rstrip("%"))


def _normalise(value: str) -> str:
    return " ".join(value.replace("_", " ").lower().split())


def _judge_choice(answer: str, truth: str) -> float:
    expected = _choice_letter(truth)
    return float(expected is not None and _choice_letter(answer) == expected)


def _judge_math(answer: str, truth: str) -> float:
    answer = answer.rsplit("=", 1)[-1]
    got, expected = _as_number(answer), _as_number(truth)
    if got is not None and expected is not None:
        return float(math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9))
    strip = lambda s: re.sub(r"\\left|\\right|\\!|\s|\$", "", s).lower()  # noqa: E731
    return float(strip(answer) == strip(truth))


def _judge_exact(answer: str, truth: str) -> float:
    return float(_normalise(answer) == _normalise(truth))


def _judge_cloze(answer: str, truth: str) -> float:
    if _judge_exact(answer, truth):
        return 1.0
    letter = _choice_letter(truth) if len(truth.strip()) <= 4 else None
    return float(letter is not None and _choice_letter(answer) == letter)


_NUMERIC_LABELS = {"0": {"a", "false", "0", "0.0"}, "1": {"b", "true", "1", "1.0"}}
_YES_NO_LABELS = {"yes": {"a", "true", "1", "1.0", "yes"}, "no": {"b", "false", "0", "0.0", "no"}}


def _judge_label(answer: str, truth: str) -> float:
    """SuperGLUE labels as RouterArena maps them: for a 0.0/1.0 truth A/false/0 -> 0 and
    B/true/1 -> 1; for a yes/no truth A/true/1 -> yes and B/false/0 -> no."""
    got, expected = _normalise(answer).strip("."), _normalise(truth).strip(".")
    if expected in ("0", "0.0", "1", "1.0"):
        return float(got in _NUMERIC_LABELS[expected[0]])
    if expected in _YES_NO_LABELS:
        return float(got in _YES_NO_LABELS[expected])
    return float(got == expected)


def _judge_chess(answer: str, truth: str) -> float:
    """Moves compared on letters and digits; a one-letter or index answer is an option letter."""
    def move(value: str) -> str:
        value = re.sub(r"[^a-z0-9]", "", value.lower())
        return (_choice_letter(value) or value) if len(value) <= 2 else value
    return float(move(answer) == move(truth))


def _words(text: str) -> list[str]:
    """Lower-case words without punctuation; Chinese text is split into characters."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return [ch for ch in text if not ch.isspace()] if _CJK.search(text) else text.split()


def meteor_variant(answer: str, truth: str) -> float:
    """RouterArena's METEOR variant: unigram F1 times (1 - 0.5 (chunks / matched words)^2), no
    penalty when every matched word is its own run. Kept as RouterArena computes it (it is not
    the published METEOR: fewer, longer runs are penalised more) so re-judged cuts match its
    scores on uncut answers."""
    got, expected = _words(answer), _words(truth)
    matches = sum((Counter(got) & Counter(expected)).values())
    if not matches:
        return 0.0
    precision, recall = matches / len(got), matches / len(expected)
    f1 = 2 * precision * recall / (precision + recall)
    shared = set(got) & set(expected)
    chunks = min(_runs(got, shared), _runs(expected, shared))
    penalty = 0.0 if chunks == len(shared) else 0.5 * (chunks / len(shared)) ** 2
    return f1 * (1.0 - penalty)


def _runs(words: list[str], shared: set[str]) -> int:
    """Number of maximal runs of consecutive words that are in ``shared``."""
    return sum(1 for i, word in enumerate(words)
               if word in shared and (i == 0 or words[i - 1] not in shared))


JUDGES = {
    "mcq_accuracy": _judge_choice,
    "math_metric": _judge_math,
    "exact_match": _judge_exact,
    "superglue_clozetest": _judge_cloze,
    "superglue_exact_match": _judge_label,
    "chess_accuracy": _judge_chess,
    "meteor_score": meteor_variant,
    "code_accuracy": lambda answer, truth: 0.0,  # needs the hidden tests; see capped_quality
}
"""RouterArena's ``evaluation_result.metric`` -> judge(answer, ground truth) in [0, 1]."""

RUNNABLE_LOCALLY = frozenset(JUDGES) - {"code_accuracy"}
"""Metrics whose full-answer judgement can be checked here against the source's score."""


def judge(answer: str | None, truth: str, metric: str) -> float:
    """Quality in [0, 1] of an extracted ``answer`` (``None``: no answer found, scores 0)."""
    return 0.0 if answer is None else min(1.0, max(0.0, JUDGES[metric](answer, truth)))


def cut_text(text: str, count_tokens: int, budget_tokens: int) -> tuple[str, bool]:
    """``text`` (``count_tokens`` long) cut at ``budget_tokens``; (kept text, whether it was cut).

    Tokens are spread evenly over characters, so the cut keeps ``len * budget / count``
    characters: consistent with the source's own token count, which the bench reports.
    """
    if count_tokens <= budget_tokens:
        return text, False
    return text[: len(text) * budget_tokens // count_tokens], True


def capped_quality(full_text: str, kept_text: str, truth: str, metric: str,
                   source_score: float) -> float:
    """Quality of ``kept_text`` (a prefix of ``full_text``, whose judged score is ``source_score``).

    An unchanged extracted answer keeps the source score; a changed one is judged here; a
    changed program (``code_accuracy``) scores 0, as a cut program is not the one that was tested.
    """
    if kept_text == full_text:
        return source_score
    kept = extract_answer(kept_text, metric)
    if kept is not None and kept == extract_answer(full_text, metric):
        return source_score
    return judge(kept, truth, metric)
