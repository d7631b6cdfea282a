"""RouterArena answer extraction and judging, and the quality of answers cut at a budget."""

import pytest

from r2ray.bench.answers import (
    JUDGES, boxed_answers, capped_quality, code_blocks, cut_text, extract_answer, judge,
    meteor_variant,
)


def test_boxed_answers_need_balanced_braces_and_are_unwrapped():
    text = r"First \boxed{{772}}, then \boxed{\frac{1}{2}} and \boxed{\text{Yes}} and \boxed{cut"
    assert boxed_answers(text) == ["772", r"\frac{1}{2}", "Yes"]


def test_code_blocks_need_the_closing_fence():
    assert code_blocks("```python\nprint(1)\n```\ntext ```python\nprint(2)") == ["print(1)"]


@pytest.mark.parametrize("metric, text, truth, expected", [
    ("mcq_accuracy", r"\boxed{D}. Video conferencing...", "3", 1.0),          # index 3 = D
    ("mcq_accuracy", r"\boxed{B. Tarrasque}", "b", 1.0),
    ("mcq_accuracy", "The correct answer is **H**. Because...", "7", 1.0),   # no box
    ("mcq_accuracy", r"\boxed{C}", "0", 0.0),
    ("math_metric", r"so \boxed{{43}} ... final \boxed{{24}}", "024", 1.0),  # last box, numeric
    ("math_metric", r"\boxed{x = 12.5}", "12.50", 1.0),
    ("math_metric", r"\boxed{13}", "12", 0.0),
    ("exact_match", r"\boxed{New York City} is big", "New_York_City", 1.0),
    ("exact_match", r"\boxed{Bahamas}", "The_Bahamas", 0.0),
    ("superglue_exact_match", r"Judgement: \boxed{1.0}", "1.0", 1.0),
    ("superglue_exact_match", r"\boxed{B}", "No", 1.0),                        # RouterArena: B=No
    ("superglue_exact_match", r"\boxed{B}", "0.0", 0.0),                       # B=1.0
    ("superglue_clozetest", r"\boxed{LEDs}", "LEDs", 1.0),
    ("chess_accuracy", r"move \boxed{g4-f3}", "g4f3", 1.0),
    ("chess_accuracy", r"\boxed{A}", "0", 1.0),
    ("code_accuracy", "```python\nprint(1)\n```", "See dataset for testcases", 0.0),
])
def test_judges_on_full_answers(metric, text, truth, expected):
    assert judge(extract_answer(text, metric), truth, metric) == expected


def test_no_answer_scores_zero_and_every_metric_has_a_judge():
    assert judge(None, "A", "mcq_accuracy") == 0.0
    assert set(JUDGES) == {"mcq_accuracy", "math_metric", "exact_match", "superglue_clozetest",
                           "superglue_exact_match", "chess_accuracy", "meteor_score",
                           "code_accuracy"}


def test_meteor_variant_hand_computed():
    assert meteor_variant("Paris", "paris.") == 1.0
    # RouterArena's formula, quirk included: one run of 3 matched words is penalised 0.5 (1/3)^2
    assert meteor_variant("the cat sat", "the cat sat") == pytest.approx(1 - 0.5 / 9)
    # 2 of 3 words match in one run: P = 2/3, R = 2/2, F1 = 0.8, chunks 1 of 2 words -> 0.8 x 0.875
    assert meteor_variant("the cat sat", "the cat") == pytest.approx(0.8 * (1 - 0.5 * 0.25))
    assert meteor_variant("dog", "the cat") == 0.0


def test_cut_text_keeps_a_token_share_of_the_characters():
    assert cut_text("abcdefghij", count_tokens=5, budget_tokens=5) == ("abcdefghij", False)
    assert cut_text("abcdefghij", count_tokens=5, budget_tokens=2) == ("abcd", True)


def test_capped_quality_keeps_the_source_score_while_the_answer_survives():
    early = r"\boxed{D} because video conferencing is synchronous and remote."
    kept, cut = cut_text(early, count_tokens=16, budget_tokens=4)
    assert cut and kept.startswith(r"\boxed{D}")
    # the source judged it 1.0; the cut keeps the same extracted answer, so the score stays
    assert capped_quality(early, kept, "3", "mcq_accuracy", source_score=1.0) == 1.0
    late = "Let me reason about each option in turn before answering. " + r"\boxed{D}"
    kept, _ = cut_text(late, count_tokens=17, budget_tokens=8)
    assert capped_quality(late, kept, "3", "mcq_accuracy", source_score=1.0) == 0.0
    code = "Here:\n```python\nprint(1)\n```\nIt prints one."
    assert capped_quality(code, code[:30], "tests", "code_accuracy", source_score=1.0) == 1.0
    assert capped_quality(code, code[:15], "tests", "code_accuracy", source_score=1.0) == 0.0
