"""The one length-instruction template and the one input-token estimate."""

import math

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from r2ray.batch.backlog import ReadUnit, validate_table
from r2ray.prompting import (MESSAGE_TYPE, estimate_tokens, estimate_tokens_array,
                             max_tokens_array, max_tokens_for, render_messages,
                             render_messages_array)

SPACES = ["\u00a0", "\u3000", "\u2028", "\u2009", "\t", "\n", "\x1c", "\u200b", " "]


def python_rule(text: str) -> int:
    return max(1, len(text.split()), math.ceil(len(text.encode()) / 4))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPACES), st.text(max_size=6)), max_size=30))
def test_estimate_is_the_unicode_word_rule(parts):
    text = "".join(parts)   # the Arrow rule the batch job prices with, and Serve's scalar one
    assert estimate_tokens_array(pa.array([text]))[0] == python_rule(text) == estimate_tokens(text)


def test_batch_validation_and_serve_price_a_query_alike():
    queries = ["a\u00a0b\u00a0c\u00a0d e", "\u3000alpha\u3000beta\u3000", "x" * 41,
               "a\u2028b\u2028c", "naïve 模型 test"]
    table = pa.table({"query_id": [f"q{i}" for i in range(len(queries))], "query": queries,
                      "__line": np.arange(1, len(queries) + 1)})
    good, bad = validate_table(table, ReadUnit("mem", 0), 1000, 3)
    assert bad.num_rows == 0
    assert good.column("input_tokens").to_pylist() == [estimate_tokens(q) for q in queries]
    assert good.column("input_tokens").to_pylist()[0] == 5  # no-break spaces split words
    assert list(estimate_tokens_array(pa.array(["", None, "  "]))) == [1, 1, 1]


def test_the_estimate_counts_utf8_bytes_not_characters():
    """A CJK character is 3 UTF-8 bytes and about a token (SmolLM2's tokenizer: 1.6), an emoji 4
    bytes and 1-3 tokens. Before the fix, 4 characters a token counted 116 CJK characters as 29
    tokens (SmolLM2: 184) and 50 emoji as 13 (SmolLM2: 150); ASCII text is counted as before."""
    cjk, emoji = "量子计算的基本原理" * 10, "😀🎉🚀👍🔥" * 10
    assert estimate_tokens(cjk) == 68 and estimate_tokens(emoji) == 50   # old: 23 and 13
    assert list(estimate_tokens_array(pa.array([cjk, emoji, "x" * 41]))) == [68, 50, 11]
    assert estimate_tokens("a\ud800b") == 2   # a lone surrogate (JSON allows it): 3 bytes


def test_the_instruction_bound_covers_what_rendering_adds():
    """The worst case at the cap prices the length instruction the prompt carries beyond the
    query: at least its UTF-8 bytes, which no tokenizer exceeds; nothing for the default arm."""
    from r2ray.prompting import instruction_tokens_bound   # new with the fix

    budgets = np.array([0, 10, 100, 4000, 100, 123_456])
    bound = instruction_tokens_bound(budgets)
    assert bound.dtype == np.int64 and bound[0] == 0 and bound[1] == bound[2] - 1 == 41
    for b, n in zip(budgets, bound):
        content = render_messages("Why? 模型", int(b))[-1]["content"]
        assert n == len(content.encode()) - len("Why? 模型".encode())


def test_budgeted_prompt_and_cap():
    messages = render_messages("Why?", 100)
    assert messages[-1]["content"].endswith("in at most 100 tokens.")
    assert max_tokens_for(100, 4096, 10) == 110 and max_tokens_for(0, 4096, 96) == 4000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(), st.sampled_from([0, 1, 20, 100, 4096])), max_size=12))
def test_batch_renders_the_messages_serve_renders(rows):
    """The batch job's column of messages is Serve's ``render_messages`` row by row: any
    unicode text, the default arm (no instruction) and budgeted ones, and no rows at all."""
    queries = pa.array([q for q, _ in rows], pa.string())
    budgets = np.array([b for _, b in rows], np.int64)
    column = render_messages_array(queries, budgets)
    assert column.type == pa.list_(MESSAGE_TYPE)
    assert column.to_pylist() == [render_messages(q, b) for q, b in rows]
    chunked = render_messages_array(pa.chunked_array([queries[:1], queries[1:]], pa.string()),
                                    budgets)
    assert chunked.to_pylist() == column.to_pylist()


TOKENS = st.integers(-2**40, 2**40)   # far inside int64: the array rule cannot overflow


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.just(0), st.integers(-50, 5000), TOKENS),
       st.one_of(st.integers(0, 300_000), TOKENS), st.one_of(st.integers(0, 300_000), TOKENS),
       st.one_of(st.integers(1, 8192), TOKENS))
def test_scalar_cap_agrees_with_the_array_rule(budget, context, input_tokens, output_cap):
    """Serve's plain-Python cap and the batch job's array rule give the same int, budgets that
    round the margin up or hit its minimum, rooms at and below 1, and the default arm."""
    array = max_tokens_array(np.array([budget]), np.array([context]), np.array([output_cap]),
                             np.array([input_tokens]))[0, 0]
    scalar = max_tokens_for(budget, context, input_tokens, output_cap)
    assert type(scalar) is int and scalar == int(array)
    assert max_tokens_for(np.int64(budget), np.int64(context), np.int64(input_tokens),
                          np.int64(output_cap)) == scalar   # catalogue fields may be numpy ints
