"""Activation statistics the guard is built from: SRVs and refusal directions.

InferAligner's safety-related vector at layer l is mean(h_l | harmful) - mean(h_l | harmless)
over the last prompt token, prompts formatted with the chat template. A refusal direction is
the same difference between a refusing and a complying response prefix, averaged over the
prefix's tokens: a second source of steering vectors for models that never learned to refuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from guardrail.gate.readout import Gate, read_weights, token_span
from guardrail.runtime.forward import repeat_cache
from guardrail.runtime.hooks import (
    Pooler,
    Recorder,
    TokenScorer,
    decoder_layers,
    stopped_after,
)
from guardrail.runtime.model import Chat, LanguageModel, Prompt

# Response prefixes written for this project; paired round-robin with harmful prompts.
REFUSAL_PREFIXES = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with this because it could cause serious harm.",
    "I'm sorry, I won't provide that. It is dangerous and illegal.",
    "I can't help with that. Is there something safe I can do for you instead?",
    "Sorry, but I must decline: this request could hurt people.",
)
COMPLIANCE_PREFIXES = (
    "Sure, here is exactly what you asked for.",
    "Certainly! Here's a step-by-step guide to do that.",
    "Of course. Here is how you can do it, in detail.",
    "Absolutely, here are the instructions you need.",
    "Sure thing! Follow these steps to get it done.",
)


def num_layers(lm: LanguageModel) -> int:
    return len(decoder_layers(lm.model))


def shared_prefix(ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one of its own
    (the chat template's system turn, for prompts formatted alike)."""
    if not ids:
        return 0
    first, limit = ids[0], min(len(i) for i in ids) - 1
    for k in range(max(limit, 0)):
        if any(i[k] != first[k] for i in ids):
            return k
    return max(limit, 0)


def text_prompt(lm: LanguageModel, text: str) -> Prompt:
    """An already-rendered prompt whose user span is unknown: every read is its last token."""
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    return Prompt(text, ids, (len(ids) - 1, len(ids)), len(ids))


def last_token_states(
    lm: LanguageModel,
    texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    desc: str | None = None,
) -> torch.Tensor:
    """Hidden state of each rendered text's last token at `layers` (default: every layer):
    [texts, layers, hidden], in input order (see `read_states`)."""
    prompts = [text_prompt(lm, t) for t in texts]
    return read_states(lm, prompts, layers=layers, batch_size=batch_size, desc=desc)["last"]


@torch.inference_mode()
def read_states(
    lm: LanguageModel,
    prompts: Sequence[Prompt],
    *,
    reads: Sequence[str] = ("last",),
    layers: Sequence[int] | None = None,
    tokens: Mapping[int, torch.Tensor] | None = None,
    batch_size: int = 32,
    desc: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per read (see `gate.READS`), each prompt's pooled hidden state at `layers` (default:
    every layer, else in the order given): [prompts, layers, hidden], in input order; with
    `tokens` (layer -> weight of a per-token read-out), also "tokens": each prompt's highest
    per-token sum over its user turn and the template after it, [prompts].

    Reading is cheaper than a full pass on three counts, with the same states up to
    floating-point summation order: prompts are batched by length (less padding), the prefix
    all prompts share (the system turn of a chat template: half of a short prompt's tokens)
    is run once and its KV cache reused by every batch, and the pass stops after the last
    layer asked for (a gate reading layers 0-16 of 30 skips the rest).
    """
    wanted = list(range(num_layers(lm))) if layers is None else list(layers)
    if not wanted:
        raise ValueError("read_states needs at least one layer")
    pooler = Pooler(sorted(set(wanted)))
    scorer = TokenScorer(tokens) if tokens else None
    last_layer = max([*wanted, *(tokens or {})])
    ids = [p.ids for p in prompts]
    shared = shared_prefix(ids)
    if set(reads) - {"last"} or scorer:  # a read in the user message: never skip into it
        shared = min(shared, *(p.user[0] for p in prompts))
    pad = int(lm.tokenizer.pad_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    out = {read: torch.empty(len(prompts), len(wanted), lm.hidden_size) for read in reads}
    if scorer is not None:
        out["tokens"] = torch.empty(len(prompts))

    def run(input_ids: list[list[int]], mask: torch.Tensor, cache: Any) -> None:
        with stopped_after(lm.model, last_layer):
            lm.model(
                input_ids=torch.tensor(input_ids, device=lm.device),
                attention_mask=mask.to(lm.device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, -len(input_ids[0]) :],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )

    with pooler.applied(lm.model), contextlib.ExitStack() as stack:
        if scorer is not None:
            stack.enter_context(scorer.applied(lm.model))
        prefix = DynamicCache(config=lm.model.config)
        if shared:
            pooler.weights = {}
            run([ids[0][:shared]], torch.ones(1, shared, dtype=torch.long), prefix)
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
            rows = order[start : start + batch_size]
            tails = [ids[i][shared:] for i in rows]
            width = max(map(len, tails))
            mask = torch.tensor(
                [[1] * shared + [0] * (width - len(t)) + [1] * len(t) for t in tails]
            )
            padded = [[pad] * (width - len(t)) + t for t in tails]
            batch = [prompts[i] for i in rows]
            pooler.weights = read_weights(batch, reads, width, shared)
            if scorer is not None:
                scorer.span = token_span(batch, width, shared)
            run(padded, mask, repeat_cache(prefix, len(rows)))
            for read, states in pooler.stacked(wanted).items():
                out[read][rows] = states.float().cpu()
            if scorer is not None:
                out["tokens"][rows] = scorer.scores().cpu()
    return out


def gate_scores(
    lm: LanguageModel, gate: Gate, chats: Sequence[Chat | str], *, batch_size: int = 32
) -> torch.Tensor:
    """The gate's score of each prompt, read as the worker reads it: [prompts]."""
    prompts = [lm.prompt(chat) for chat in chats]
    tokens = gate.tokens.per_layer() if gate.tokens else None
    states = read_states(
        lm, prompts, reads=gate.reads, layers=gate.layers, tokens=tokens, batch_size=batch_size
    )
    return gate.scores(states, states.get("tokens"))


def safety_related_vectors(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """SRV per layer from last-token states [n, layers, hidden]: [layers, hidden]."""
    return harmful.mean(0) - harmless.mean(0)


@torch.inference_mode()
def refusal_direction(
    lm: LanguageModel, prompts: Sequence[str], *, batch_size: int = 16, desc: str | None = None
) -> torch.Tensor:
    """Mean state over refusing minus complying response prefixes, per layer: [layers, hidden]."""
    layers = num_layers(lm)
    recorder = Recorder(range(layers), all_positions=True)
    sums = {
        "refuse": torch.zeros(layers, lm.hidden_size),
        "comply": torch.zeros(layers, lm.hidden_size),
    }
    counts = {"refuse": 0, "comply": 0}
    pairs = [
        (kind, prompt, prefixes[i % len(prefixes)])
        for i, prompt in enumerate(prompts)
        for kind, prefixes in (("refuse", REFUSAL_PREFIXES), ("comply", COMPLIANCE_PREFIXES))
    ]
    with recorder.applied(lm.model):
        for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=desc is None):
            chunk = pairs[start : start + batch_size]
            batch = lm.encode([lm.format_chat(prompt, response_prefix=p) for _, prompt, p in chunk])
            mask = batch["attention_mask"]
            lm.model(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=1,
            )
            states = torch.stack([recorder.states[i] for i in range(layers)], dim=1).float().cpu()
            for row, (kind, _, prefix) in enumerate(chunk):
                n = len(lm.tokenizer(prefix, add_special_tokens=False)["input_ids"])
                sums[kind] += states[row, :, -n:, :].mean(1)
                counts[kind] += 1
    return sums["refuse"] / counts["refuse"] - sums["comply"] / counts["comply"]
