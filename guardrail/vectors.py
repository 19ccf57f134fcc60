"""Activation statistics the guard is built from: SRVs and refusal directions.

InferAligner's safety-related vector at layer l is mean(h_l | harmful) - mean(h_l | harmless)
over the last prompt token, prompts formatted with the chat template. A refusal direction is
the same difference between a refusing and a complying response prefix, averaged over the
prefix's tokens: a second source of steering vectors for models that never learned to refuse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from guardrail.hooks import Recorder, decoder_layers
from guardrail.model import LanguageModel

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


@torch.inference_mode()
def last_token_states(
    lm: LanguageModel, texts: Sequence[str], *, batch_size: int = 32, desc: str | None = None
) -> torch.Tensor:
    """Hidden state of each text's last token at every layer: [texts, layers, hidden].

    Texts are batched by length (less padding, same results), and returned in input order.
    """
    recorder = Recorder(range(num_layers(lm)))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), len(recorder.layers), lm.hidden_size)
    with recorder.applied(lm.model):
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=desc is None):
            rows = order[start : start + batch_size]
            batch = lm.encode([texts[i] for i in rows])
            mask = batch["attention_mask"]
            lm.model(
                input_ids=batch["input_ids"],
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                logits_to_keep=1,
            )
            out[rows] = torch.stack([recorder.states[i] for i in recorder.layers], 1).float().cpu()
    return out


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
