"""The one length-instruction template, used identically in bench building, batch output and Serve.

A budgeted arm (budget b > 0 tokens) gets the instruction appended to the user's turn and a hard
``max_tokens`` cap of b plus a small margin, so a model that overshoots slightly is not cut mid-word
while one that ignores the instruction is stopped. The default arm (b = 0) gets no instruction: the
model writes at its own length, capped at its output cap (catalogue ``max_output_tokens``, else
``DEFAULT_MAX_OUTPUT_TOKENS``). No cap exceeds what the context window leaves after the input and
the instruction (bounded by its UTF-8 bytes).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from r2ray.catalog import DEFAULT_BUDGET, DEFAULT_MAX_OUTPUT_TOKENS

LENGTH_INSTRUCTION = "Answer concisely, in at most {budget_tokens} tokens."
CAP_MARGIN_SHARE = 0.10   # max_tokens = budget × (1 + share), at least budget + CAP_MARGIN_MIN
CAP_MARGIN_MIN = 8        # tokens


def max_tokens_array(budget_tokens: np.ndarray, context_tokens: np.ndarray,
                     output_cap_tokens: np.ndarray, input_tokens: np.ndarray) -> np.ndarray:
    """Hard output caps int64 [N, K], the one rule: arms' budget, context and output cap [K]
    (tokens) against prompts of ``input_tokens`` [N]. A budgeted arm gets its budget plus margin,
    the default arm its output cap; neither more than room = max(1, context − input − the length
    instruction's bound, :func:`instruction_tokens_bound`): the prompt sent carries it."""
    budget = np.asarray(budget_tokens, dtype=np.int64)
    margin = np.maximum(CAP_MARGIN_MIN, np.ceil(budget * CAP_MARGIN_SHARE).astype(np.int64))
    cap = np.where(budget == DEFAULT_BUDGET, np.asarray(output_cap_tokens, np.int64),
                   budget + margin)
    room = np.maximum(1, (np.asarray(context_tokens, np.int64)
                          - instruction_tokens_bound(budget))[None, :]
                      - np.asarray(input_tokens, np.int64)[:, None])
    return np.minimum(room, cap[None, :])


def max_tokens_for(budget_tokens: int, context_tokens: int, input_tokens: int,
                   output_cap_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS) -> int:
    """Hard output cap in tokens of one arm for one prompt: :func:`max_tokens_array`'s rule in
    plain Python (tested to agree on many inputs). Serve renders every routed request with it,
    and four one-element arrays through the array rule cost ~70-200 µs with cold caches."""
    budget = int(budget_tokens)
    cap = int(output_cap_tokens) if budget == DEFAULT_BUDGET else \
        budget + max(CAP_MARGIN_MIN, math.ceil(budget * CAP_MARGIN_SHARE))
    return min(max(1, int(context_tokens) - int(input_tokens) - instruction_bytes(budget)), cap)


def length_suffix(budget_tokens: int) -> str:
    """What a query at this budget gets appended to its user turn: the instruction after a blank
    line, nothing for the default arm."""
    if budget_tokens == DEFAULT_BUDGET:
        return ""
    return f"\n\n{LENGTH_INSTRUCTION.format(budget_tokens=int(budget_tokens))}"


def instruction_bytes(budget_tokens: int) -> int:
    """UTF-8 bytes the length instruction adds to a prompt at this budget (0: default arm): no
    tokenizer yields more tokens than bytes, so the cap's room and the worst case bound it so."""
    return len(length_suffix(budget_tokens).encode())


def instruction_tokens_bound(budget_tokens: np.ndarray) -> np.ndarray:
    """Upper bound (int64 [K], tokens) on what the length instruction adds to each arm's prompt:
    its UTF-8 bytes (no tokenizer yields more tokens than bytes; ~43 for a 4-digit budget), 0 for
    the default arm. A given ``input_tokens`` counts the query only, so the worst case at the
    cap adds this for the prompt actually sent."""
    return _per_budget_level(budget_tokens, instruction_bytes)


def instruction_tokens_estimate(budget_tokens: np.ndarray) -> np.ndarray:
    """Estimated tokens (int64 [K]) the length instruction adds to each arm's prompt: the
    :func:`estimate_tokens` of its text (11 for a 3- or 4-digit budget), 0 for the default arm.
    A given ``input_tokens`` counts the query only, and every budgeted call's bill carries the
    instruction too, so ĉ adds this (:func:`r2ray.routing.call_cost_usd`); at ~11 tokens it is a
    fifth of ĉ on a 10-token arm of a short query."""
    return _per_budget_level(budget_tokens, lambda b: 0 if b == DEFAULT_BUDGET
                             else estimate_tokens(length_suffix(b)))


def _per_budget_level(budget_tokens: np.ndarray, tokens_at) -> np.ndarray:
    """int64 array of ``budget_tokens``' shape: ``tokens_at(budget)`` computed once per distinct
    budget (a grid has a few dozen levels) and spread back over the arms."""
    budgets = np.asarray(budget_tokens, dtype=np.int64)
    levels, index = np.unique(budgets, return_inverse=True)
    per_level = np.array([tokens_at(int(b)) for b in levels], dtype=np.int64)
    return per_level[index.reshape(budgets.shape)]


def render_messages(query: str, budget_tokens: int,
                    system_prompt: str | None = None) -> list[dict[str, str]]:
    """OpenAI-style chat messages for one query at one budget."""
    content = query + length_suffix(budget_tokens)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": content})
    return messages


MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])


def render_messages_array(queries: pa.Array | pa.ChunkedArray,
                          budget_tokens: np.ndarray) -> pa.ListArray:
    """:func:`render_messages` of N queries at their budgets [N] (no system prompt), as an Arrow
    list<struct<role, content>> column: one user turn each (tested to agree row by row). The
    batch job renders every routed row with it; Python's per-row dicts cost ~8 µs a row."""
    budgets = np.asarray(budget_tokens, dtype=np.int64)
    n = len(budgets)
    levels, index = np.unique(budgets, return_inverse=True)
    suffixes = pa.array([length_suffix(int(b)) for b in levels], pa.string())
    content = pc.binary_join_element_wise(
        queries, suffixes.take(pa.array(index.reshape(n), pa.int32())), "")
    if isinstance(content, pa.ChunkedArray):
        content = content.combine_chunks()
    turns = pa.StructArray.from_arrays([pa.repeat(pa.scalar("user"), n), content],
                                       fields=list(MESSAGE_TYPE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), turns)


def lone_surrogate_at(value: object) -> int | None:
    """Where the first lone surrogate of a str lies (JSON's ``\\ud83d`` escape alone decodes to
    one, and UTF-8 cannot carry it: no Arrow column or result row can hold it); None: none, or not
    a str."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return err.start


def estimate_tokens(text: str | None) -> int:
    """Rough token count of one text: :func:`estimate_tokens_array`'s rule on one string, in
    plain Python. Serve prices every request with it, and six Arrow kernels over a one-row array
    cost ~0.3 ms where this costs ~1 µs; ``str.split()`` splits on the same Unicode white space
    as Arrow's ``utf8_split_whitespace`` (tested to agree on every code point)."""
    text = text or ""   # a null text counts as empty, as in the array rule
    n_bytes = len(text.encode("utf-8", "surrogatepass"))   # a lone surrogate from JSON: 3 bytes
    return max(1, len(text.split()), -(-n_bytes // 4))


def estimate_tokens_array(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Rough token counts (int64 [n]): about 4 UTF-8 bytes a token, at least one per word, at
    least 1; for inputs only, where a source gives no count. A null text counts as empty. Bytes,
    not characters: byte-level BPE vocabularies spend a token on ~4 bytes of English but one or
    more on a CJK character (3 bytes) or an emoji (4), where 4 characters a token counted 6-11×
    too few (SmolLM2's tokenizer; bytes: 2-3×). Not an upper bound: only bytes are.

    The one estimate the batch job, Serve and the bench adapters share, so a query is priced the
    same everywhere. Words split on Unicode white space (no-break and ideographic spaces, line
    separators), as Python's ``str.split()`` does. Routing only needs input tokens for the
    input-cost term, small next to output cost for all but the longest prompts.
    """
    trimmed = pc.utf8_trim_whitespace(texts)
    words = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    words = pc.if_else(pc.equal(pc.utf8_length(trimmed), 0), 0, words)
    n_bytes = pc.binary_length(texts)
    words = pc.fill_null(words, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    n_bytes = pc.fill_null(n_bytes, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.maximum(1, np.maximum(words, -(-n_bytes // 4)))
