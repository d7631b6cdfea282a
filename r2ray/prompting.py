"""The one length-instruction template, used identically in bench building, batch output and Serve.

A budgeted arm (budget b > 0 tokens) gets the instruction appended to the user's turn and a hard
``max_tokens`` cap of b plus a small margin, so a model that overshoots slightly is not cut mid-word
while one that ignores the instruction is stopped. The default arm (b = 0) gets neither: the model
writes at its own length, capped only by its context window.
"""

from __future__ import annotations

import math

from r2ray.catalog import DEFAULT_BUDGET

LENGTH_INSTRUCTION = "Answer concisely, in at most {budget_tokens} tokens."
CAP_MARGIN_SHARE = 0.10   # max_tokens = budget × (1 + share), at least budget + CAP_MARGIN_MIN
CAP_MARGIN_MIN = 8        # tokens


def max_tokens_for(budget_tokens: int, context_tokens: int, input_tokens: int) -> int:
    """Hard output cap in tokens: budget plus margin, never beyond what the context window leaves."""
    room = max(1, int(context_tokens) - int(input_tokens))
    if budget_tokens == DEFAULT_BUDGET:
        return room
    margin = max(CAP_MARGIN_MIN, math.ceil(budget_tokens * CAP_MARGIN_SHARE))
    return min(room, int(budget_tokens) + margin)


def render_messages(query: str, budget_tokens: int,
                    system_prompt: str | None = None) -> list[dict[str, str]]:
    """OpenAI-style chat messages for one query at one budget."""
    content = query if budget_tokens == DEFAULT_BUDGET else (
        f"{query}\n\n{LENGTH_INSTRUCTION.format(budget_tokens=int(budget_tokens))}")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": content})
    return messages


def estimate_tokens(text: str) -> int:
    """Rough token count (about 4 characters a token, at least one per word); for inputs only.

    Used where a source gives no count. Routing only needs input tokens for the input-cost term,
    which is small next to output cost for all but the longest prompts.
    """
    return max(1, len(text.split()), math.ceil(len(text) / 4))
