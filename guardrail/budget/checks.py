"""What the stream's cost check reads: the prompt it scores against and the texts it checks.

The worker checks an answer every `chunk_tokens` tokens before releasing it; offline scoring
(`guardrail score`, benches) holds an existing answer to its budget the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guardrail.budget.latent import state_reader
from guardrail.budget.scoring import CostModel
from guardrail.runtime.model import Chat


def cost_query(chat: Chat | str) -> str:
    """The text a cost model reads as the prompt: the last user message (the last message
    when no turn is the user's)."""
    if isinstance(chat, str):
        return chat
    users = [m["content"] for m in chat if m.get("role") == "user"]
    return users[-1] if users else (chat[-1]["content"] if chat else "")


def checked_texts(tokenizer: Any, response: str, chunk_tokens: int = 16) -> list[str]:
    """What the worker's cost check reads of `response` as it streams it: the answer so far at
    every `chunk_tokens` tokens (a character split across tokens held back, as mid-answer) and
    the whole answer, stripped too when that changes it (a final answer is checked both ways).

    The tokens are `response` tokenized again by the target model's tokenizer: the stream's
    own boundaries whenever the model produced the canonical tokens, as it nearly always does.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    texts = [
        str(tokenizer.decode(ids[:n], skip_special_tokens=True)).rstrip("\ufffd")
        for n in range(chunk_tokens, len(ids), chunk_tokens)
    ]
    texts.append(response)
    if response.strip() != response:
        texts.append(response.strip())
    return texts


def answer_costs(
    cost: CostModel,
    queries: Sequence[str],
    responses: Sequence[str],
    *,
    tokenizer: Any,
    chunk_tokens: int = 16,
) -> list[float]:
    """Each response's cost as a served answer is held to a budget: the highest cost of its
    `checked_texts` (a stream stops at the first check over budget, so an answer is within
    budget only if every check is). One cost call for all of them."""

    if (latent := state_reader(cost)) is not None:
        return _latent_answer_costs(latent, queries, responses, chunk_tokens)
    groups = [checked_texts(tokenizer, r, chunk_tokens) for r in responses]
    prompts = [q for q, group in zip(queries, groups, strict=True) for _ in group]
    scores = iter(cost.cost(prompts, [t for group in groups for t in group]))
    return [max(float(next(scores)) for _ in group) for group in groups]


def _latent_answer_costs(
    latent: Any, queries: Sequence[str], responses: Sequence[str], chunk_tokens: int
) -> list[float]:
    """`answer_costs` for the latent cost model: the states of every chunk boundary of an
    answer come out of one pass over it (as the worker reads them while decoding), and the
    stripped answer, where it differs, gets a pass of its own."""
    tokenizer = latent.lm.tokenizer
    peaks: list[float] = []
    for start in range(0, len(responses), 64):  # bounded memory: [64, checks, layers, hidden]
        group = responses[start : start + 64]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in group)
        at: list[int | None] = [*range(chunk_tokens, longest, chunk_tokens), None]
        along = latent.costs_along(queries[start : start + 64], group, at)
        peaks += along.max(dim=1).values.tolist()
    stripped = [i for i, r in enumerate(responses) if r.strip() != r]
    if stripped:
        again = latent.cost(
            [queries[i] for i in stripped], [responses[i].strip() for i in stripped]
        )
        for i, value in zip(stripped, again, strict=True):
            peaks[i] = max(peaks[i], value)
    return [float(v) for v in peaks]


__all__ = ["answer_costs", "checked_texts", "cost_query"]
