"""The gate's token read: a per-token probe kept at its highest over the user's turn.

The pooled probe reads the last prompt token, where a suffix or a template's closing text
can hide the request. A causal model's states over the request itself do not change with
what follows it, so a probe scored at every token and kept at its highest still reads the
request there (bench/eval_gate_reads.py measured it: beside the pooled probe, recall on an
optimised-looking suffix the gate never saw rose from 0.33 to 0.77, at the same false alarms).

It is fitted on token-level labels: the request's last token is harmful; every token of a
benign prompt, and every template token before a harmful request, is harmless (tokens after
a harmful request are left out: its intent is known and read there). The `fit` prompts are
seen plain, in templates (the calibration's and the non-held-out jailbreakchat ones) and
with random-token suffixes, both classes alike. Each part's threshold is set at half the
target FPR on harmless `select` prompts, the token read is shifted onto the pooled probe's
scale, and the gate fires on the higher of the two.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.calibrate import datasets
from guardrail.errors import CalibrationError
from guardrail.gate.readout import Gate, TokenRead
from guardrail.gate.vectors import num_layers, read_states
from guardrail.probes import auroc, fit_probe, rates, threshold_at_fpr
from guardrail.runtime.hooks import Recorder, stopped_after
from guardrail.runtime.model import Chat, LanguageModel, Prompt

WRAP_SHARE, SUFFIX_SHARE = 0.4, 0.2  # of `fit` prompts also seen wrapped / suffixed
HARMLESS_TOKENS, TEMPLATE_TOKENS = 24, 8  # sampled per harmless prompt / before a request


def extra_templates() -> list[str]:
    """Templates the token read's `fit` prompts are also wrapped in, beside calibration's:
    the jailbreakchat templates calibration may use (not the 10 held out)."""
    return datasets.load_templates(datasets.jailbreakchat_templates())


def token_layers(lm: LanguageModel, fractions: Sequence[float]) -> tuple[int, ...]:
    depth = num_layers(lm)
    return tuple(sorted({min(depth - 1, round(f * depth)) for f in fractions}))


def augmented(
    prompts: Sequence[str], templates: Sequence[str], tokenizer: Any
) -> list[tuple[str, str]]:
    """(text, request) pairs: each prompt, and a hash-chosen share of them wrapped or
    suffixed (`datasets.wrap`, `datasets.with_suffixes`: stable across runs)."""
    pairs = [(p, p) for p in prompts]
    for p in prompts:
        pairs += [(w, p) for w in datasets.wrap([p], templates, WRAP_SHARE)]
        pairs += [(s, p) for s in datasets.with_suffixes([p], tokenizer, SUFFIX_SHARE)]
    return pairs


def request_span(lm: LanguageModel, prompt: Prompt, request: str) -> tuple[int, int]:
    """The token span [start, end) of `request` inside the rendered prompt (the user's whole
    message when it cannot be found)."""
    at = prompt.text.rfind(request.strip())
    if at < 0:
        return prompt.user
    stop = at + len(request.strip())
    offsets = lm.tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    inside = [t for t, (a, b) in enumerate(offsets[: prompt.end]) if a < stop and b > at]
    return (inside[0], inside[-1] + 1) if inside else prompt.user


def labelled_positions(
    lm: LanguageModel, pairs: Sequence[tuple[str, str]], harmful: bool
) -> tuple[list[Prompt], list[list[int]]]:
    """Each prompt and the positions it contributes: a harmful prompt's request end (its
    positive) and template tokens before the request; a harmless prompt's sampled tokens."""
    prompts, positions = [], []
    for text, request in pairs:
        prompt = lm.prompt([{"role": "user", "content": text}])
        rng = random.Random(text)
        start, stop = request_span(lm, prompt, request)
        if harmful:
            before = list(range(prompt.user[0], start))
            picked = [stop - 1, *rng.sample(before, min(TEMPLATE_TOKENS, len(before)))]
        else:
            span = list(range(prompt.user[0], prompt.end))
            picked = rng.sample(span, min(HARMLESS_TOKENS, len(span)))
        prompts.append(prompt)
        positions.append(picked)
    return prompts, positions


@torch.inference_mode()
def picked_states(
    lm: LanguageModel,
    prompts: Sequence[Prompt],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """Each prompt's states at its positions and `layers`: [positions, layers * hidden]."""
    recorder = Recorder(layers, all_positions=True)
    pad = int(lm.tokenizer.pad_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    with recorder.applied(lm.model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i].ids) for i in rows)
            pads = [width - len(prompts[i].ids) for i in rows]
            mask = torch.tensor([[0] * p + [1] * (width - p) for p in pads])
            with stopped_after(lm.model, max(layers)):
                lm.model(
                    input_ids=torch.tensor(
                        [[pad] * p + prompts[i].ids for p, i in zip(pads, rows, strict=True)],
                        device=lm.device,
                    ),
                    attention_mask=mask.to(lm.device),
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(lm.device),
                    use_cache=False,
                    logits_to_keep=1,
                )
            states = torch.stack([recorder.states[layer] for layer in layers], dim=2)
            for row, (i, p) in enumerate(zip(rows, pads, strict=True)):
                picked = [p + t for t in positions[i]]
                out[i] = states[row, picked].flatten(1).float().cpu()
    return out


def fit_token_read(
    lm: LanguageModel,
    gate: Gate,
    fit: dict[str, list[str]],
    select: dict[str, list[list[Chat]]],
    select_pooled: dict[str, torch.Tensor],
    templates: Sequence[str],
    fractions: Sequence[float],
    l2s: Sequence[float],
    target_fpr: float,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[Gate, torch.Tensor, list[dict[str, Any]]]:
    """The gate with a token read beside its pooled probe, its scores on harmless `select`
    prompts, and a row per L2 tried (chosen: the best TPR on harmful `select` prompts).

    `fit`: the `fit` prompts as asked, per class; `select`: the `select` chats per class, in
    groups read together (as the pooled probe's were); `select_pooled`: the pooled probe's
    scores on them, in the same order."""
    layers = token_layers(lm, fractions)
    features: dict[str, list[torch.Tensor]] = {}
    for kind in ("harmful", "harmless"):
        pairs = augmented(fit[kind], templates, lm.tokenizer)
        prompts, positions = labelled_positions(lm, pairs, kind == "harmful")
        desc = f"token read: {kind}/fit" if progress else None
        features[kind] = picked_states(lm, prompts, positions, layers, desc=desc)
    positive = torch.stack([f[0] for f in features["harmful"]])
    negative = torch.cat([*features["harmless"], *(f[1:] for f in features["harmful"])])

    def token_scores(read: TokenRead, kind: str) -> torch.Tensor:
        sums = [
            read_states(
                lm,
                [lm.prompt(chat) for chat in group],
                reads=(),
                layers=read.layers,
                tokens=read.per_layer(),
                batch_size=batch_size,
            )["tokens"]
            for group in select[kind]
        ]
        return read.scores(torch.cat(sums))

    best: tuple[float, Gate, torch.Tensor, dict[str, Any]] | None = None
    rows = []
    half = target_fpr / 2
    for l2 in l2s:
        weight, bias = fit_probe(positive, negative, l2=l2)
        read = TokenRead(layers, weight, bias)
        harmful, harmless = token_scores(read, "harmful"), token_scores(read, "harmless")
        read.shift = threshold_at_fpr(select_pooled["harmless"], half) - threshold_at_fpr(
            harmless, half
        )
        both = {
            kind: torch.maximum(select_pooled[kind], scores + read.shift)
            for kind, scores in (("harmful", harmful), ("harmless", harmless))
        }
        threshold = threshold_at_fpr(both["harmless"], target_fpr)
        tpr, fpr = rates(both["harmful"], both["harmless"], threshold)
        alone = rates(harmful, harmless, threshold_at_fpr(harmless, target_fpr))[0]
        row: dict[str, Any] = {
            "layers": list(layers),
            "l2": l2,
            "tpr": round(tpr, 4),
            "fpr": round(fpr, 4),
            "token_read_tpr": round(alone, 4),
            "token_read_auroc": round(auroc(harmful, harmless), 4),
            "chosen": False,
        }
        rows.append(row)
        combined = Gate(gate.layers, gate.weight, gate.bias, threshold, gate.kind, gate.reads, read)
        if best is None or tpr > best[0]:
            best = (tpr, combined, both["harmless"], row)
    if best is None:
        raise CalibrationError("token_l2 needs at least one value")
    best[3]["chosen"] = True
    return best[1], best[2], rows
