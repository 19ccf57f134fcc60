"""A KV-cached decode loop over left-padded batches, split into prefill and decode.

The split is the point: the guard reads the gate between the two steps and decides, row by
row, what happens next, without a second pass for rows it leaves alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guardrail.errors import ModelError
from guardrail.runtime.hooks import Steering
from guardrail.runtime.model import LanguageModel


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
    return Prefilled(out.cache, mask, out.logits[:, -1, :].float())


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
            cache=cache,
            use_cache=True,
        )
        cache, logits = out.cache, out.logits[:, -1, :].float()
    return tokens


# --- Step-wise decoding for a scheduler --------------------------------------------------
#
# `decode` above runs a fixed batch to the end. A shared worker instead advances a changing
# set of rows one token at a time: rows leave when they finish (or are cancelled) and new rows
# join after their own prefill. The functions below are that step loop's primitives; they work
# on `Prefilled` (cache, mask, pending logits), which is also the state between steps.


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(
        getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") for layer in layers
    ):
        raise ModelError(
            f"row-wise batching needs a dynamic (non-sliding) KV cache, got {type(cache).__name__}"
        )
    return list(layers)


def repeat_cache(cache: Any, rows: int) -> Any:
    """A copy of a one-row KV cache for `rows` rows: a prefix that every row shares, computed
    once. The copies are views until a forward pass appends to them (the cache concatenates)."""
    copied = copy.deepcopy(cache)
    for layer in getattr(copied, "layers", []):  # sliding-window layers too: nothing is trimmed
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
    return copied


def select_rows(state: Prefilled, indices: Sequence[int]) -> Prefilled:
    """Keep only `indices` (in that order); drop the leading columns no kept row uses.

    Trimming matters: a long prompt that finished early would otherwise keep every later step
    paying attention over its padding.
    """
    index = torch.tensor(list(indices), dtype=torch.long, device=state.attention_mask.device)
    mask = state.attention_mask.index_select(0, index)
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in _cache_layers(state.cache):
        if layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
    return Prefilled(state.cache, mask[:, start:], state.next_logits.index_select(0, index))


def _pad_left(tensor: torch.Tensor, dim: int, amount: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def concat_rows(first: Prefilled, second: Prefilled) -> Prefilled:
    """Stack two states' rows (first's rows, then second's), left-padding the shorter cache.

    Padded key/value slots are masked out, and positions come from the mask, so each row
    continues exactly as it would alone (up to floating-point summation order).
    """
    length = max(first.attention_mask.shape[1], second.attention_mask.shape[1])
    pads = [length - s.attention_mask.shape[1] for s in (first, second)]
    for layer_a, layer_b in zip(
        _cache_layers(first.cache), _cache_layers(second.cache), strict=True
    ):
        layer_a.keys = torch.cat(
            [_pad_left(layer_a.keys, 2, pads[0]), _pad_left(layer_b.keys, 2, pads[1])]
        )
        layer_a.values = torch.cat(
            [_pad_left(layer_a.values, 2, pads[0]), _pad_left(layer_b.values, 2, pads[1])]
        )
    mask = torch.cat(
        [_pad_left(first.attention_mask, 1, pads[0]), _pad_left(second.attention_mask, 1, pads[1])]
    )
    logits = torch.cat([first.next_logits, second.next_logits])
    return Prefilled(first.cache, mask, logits)


def pick_rows(
    logits: torch.Tensor,
    samplings: Sequence[Sampling],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of each row under that row's own settings and random generator.

    Greedy rows take one argmax for all; each sampled row draws from its own generator, so a
    seeded request gets the same tokens whichever batch it shares.
    """
    picked = logits.argmax(-1)
    for row, (sampling, generator) in enumerate(zip(samplings, generators, strict=True)):
        if sampling.temperature > 0:
            picked[row] = _pick(logits[row : row + 1], sampling, generator)[0]
    return picked


def steered_generate(
    lm: LanguageModel,
    texts: Sequence[str],
    vectors: dict[int, torch.Tensor],
    coefficients: torch.Tensor,
    sampling: Sampling,
) -> list[list[int]]:
    """Prefill and decode with per-row steering coefficients (0 leaves a row untouched)."""
    steering = Steering(vectors)
    steering.coefficients = coefficients.to(lm.device)
    with steering.applied(lm.model):
        return decode(lm, prefill(lm, texts), sampling)


@torch.inference_mode()
def token_nlls(
    lm: LanguageModel, prompts: Sequence[str], responses: Sequence[str]
) -> list[torch.Tensor]:
    """Each response token's negative log-likelihood as a continuation of its prompt under the
    (unhooked) model: one pass for the batch (a prefix's NLL is a slice of its answer's)."""
    answers = [lm.tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    batch = lm.encode([lm.format_chat(p) + r for p, r in zip(prompts, responses, strict=True)])
    mask = batch["attention_mask"]
    # Left padding puts every answer at the end: only the last `keep` positions need logits.
    keep = min(max(len(a) for a in answers) + 1, mask.shape[1])
    logits = lm.model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=keep,
    ).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2),
        batch["input_ids"][:, mask.shape[1] - keep + 1 :],
        reduction="none",
    )
    return [nll[row, nll.shape[1] - len(a) :] for row, a in enumerate(answers)]
