"""A KV-cached decode loop over left-padded batches, split into prefill and decode.

The split is the point: the guard reads the gate between the two steps and decides, row by
row, what happens next, without a second pass for rows it leaves alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guardrail.model import LanguageModel


@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Prefilled:
    """The state after the prompt pass: KV cache, mask and the logits of the next token."""

    cache: Any
    attention_mask: torch.Tensor
    next_logits: torch.Tensor


@torch.inference_mode()
def prefill(lm: LanguageModel, texts: Sequence[str]) -> Prefilled:
    """Run the prompts once; hooks registered by the caller see this pass."""
    batch = lm.encode(texts)
    mask = batch["attention_mask"]
    out = lm.model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    return Prefilled(out.past_key_values, mask, out.logits[:, -1, :].float())


def _pick(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode(
    lm: LanguageModel,
    state: Prefilled,
    sampling: Sampling,
    *,
    skip: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per row; rows in `skip` produce nothing.

    Returns the new token ids of each row, without the end-of-turn token.
    """
    rows = state.next_logits.shape[0]
    device = state.next_logits.device
    done = torch.zeros(rows, dtype=torch.bool, device=device) if skip is None else skip.clone()
    eos = torch.tensor(lm.eos_token_ids, device=device)
    pad = int(lm.tokenizer.pad_token_id)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    mask, cache, logits = state.attention_mask, state.cache, state.next_logits
    for step in range(sampling.max_new_tokens):
        picked = _pick(logits, sampling, generator)
        done |= torch.isin(picked, eos)
        if bool(done.all()):
            break
        for row in (~done).nonzero().squeeze(-1).tolist():
            tokens[row].append(int(picked[row]))
        if step == sampling.max_new_tokens - 1:
            break
        picked = torch.where(done, torch.full_like(picked, pad), picked)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=-1)
        out = lm.model(
            input_ids=picked[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
    return tokens
