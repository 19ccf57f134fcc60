"""The latent cost model: a probe on the target model's own hidden states over (prompt, answer).

The target model has read the request and written the answer, so its states carry what the
pair means together ("Sure, here are the steps" after a bread recipe and after a pipe bomb
differ there, not in the answer's text). `LatentCost` reads the residual stream at
calibrated layers over `chat template(prompt) + answer`, either at the answer's last token
(`last`) or averaged over its tokens (`mean`, calibration's choice: on human-labelled
answers it separates far better for a 135M model), and applies a logistic probe; cost =
`COST_SCALE * sigmoid(w . h + b)`, shifted at calibration as the MiniLM probe is (cost 5 =
the operating point).

`cost()` runs the pair through the model, up to the last layer read (offline scoring,
search candidates, any text); `cost_of_states()` scores states the worker already computed
while decoding, with no extra pass. Both read the unsteered model: a steered row's states
differ, so the worker scores those rows by text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from guardrail.budget.scoring import COST_SCALE
from guardrail.errors import ModelError
from guardrail.probes import auroc, fit_probe
from guardrail.runtime.hooks import Recorder, stopped_after
from guardrail.runtime.model import LanguageModel

READS = ("last", "mean")
MAX_PROMPT_TOKENS = 512  # the prompt's last tokens (the request sits at its end)
MAX_ANSWER_TOKENS = 2048  # the answer's first tokens (training reads fewer, for speed)


def pair_ids(
    lm: LanguageModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
) -> list[tuple[list[int], int]]:
    """Per pair, the token ids the worker decodes (the rendered prompt, then the answer as
    its own tokens) and how many of them are the answer."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        head = lm.tokenizer(lm.format_chat(prompt), add_special_tokens=False)["input_ids"]
        answer = lm.tokenizer(response, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        out.append((list(head[-MAX_PROMPT_TOKENS:]) + list(answer), len(answer)))
    return out


@torch.inference_mode()
def answer_states(
    lm: LanguageModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    layers: Sequence[int],
    *,
    at: Sequence[int | None] = (None,),
    reads: Sequence[str] = ("last",),
    batch_size: int = 16,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
) -> dict[str, torch.Tensor]:
    """Hidden states at `layers` where each answer is `at` tokens long (None: all of it;
    shorter answers are read at their end), per read: `last`, the state of that token;
    `mean`, the mean over the answer's tokens up to it. Each is [pairs, len(at),
    len(layers), hidden], float32 on the CPU. Pairs are batched by length with right
    padding, so each row reads only its own tokens."""
    pairs = pair_ids(lm, prompts, responses, max_answer_tokens=max_answer_tokens)
    out = {read: torch.zeros(len(pairs), len(at), len(layers), lm.hidden_size) for read in reads}
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    pad = int(lm.tokenizer.pad_token_id)
    recorder = Recorder(layers, all_positions=True)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids = [pairs[i][0] for i in rows]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=lm.device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=lm.device)
        with recorder.applied(lm.model), stopped_after(lm.model, max(layers)):
            lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        hidden = torch.stack([recorder.states[layer] for layer in layers], dim=2)  # [r, s, l, h]
        for row, i in enumerate(rows):
            total, answer = len(pairs[i][0]), pairs[i][1]
            first = total - answer
            for k, n in enumerate(at):
                end = first + (answer if n is None else min(n, answer))
                if "last" in out:
                    out["last"][i, k] = hidden[row, max(end - 1, 0)].float().cpu()
                if "mean" in out:
                    span = hidden[row, first:end] if end > first else hidden[row, end - 1 : end]
                    out["mean"][i, k] = span.float().mean(0).cpu()
    return out


class LatentCost:
    """`COST_SCALE * sigmoid(w . h + b)` over the target's states at `layers`, concatenated;
    `read`: `last`, the answer's last token, or `mean`, the mean over the answer's tokens."""

    name = "latent-cost"
    reads_prompt = True

    def __init__(
        self,
        lm: LanguageModel,
        layers: Sequence[int],
        weight: torch.Tensor,
        bias: float,
        *,
        read: str = "last",
        batch_size: int = 16,
    ) -> None:
        self.lm, self.layers, self.batch_size = lm, [int(i) for i in layers], batch_size
        if read not in READS:
            raise ModelError(f"latent cost read {read!r}; known: {', '.join(READS)}")
        if weight.shape != (len(self.layers) * lm.hidden_size,):
            raise ModelError(
                f"latent cost probe weight has shape {tuple(weight.shape)}; {len(self.layers)} "
                f"layers of {lm.hidden_size} need {len(self.layers) * lm.hidden_size}"
            )
        self.read, self.weight, self.bias = read, weight.float(), float(bias)
        digest = torch.cat([self.weight, torch.tensor([self.bias])]).numpy().tobytes()
        self.fingerprint = (
            f"{lm.fingerprint}-{read}-L{'.'.join(map(str, self.layers))}-"
            f"{hashlib.sha256(digest).hexdigest()[:12]}"
        )

    def logits_of_states(self, states: torch.Tensor) -> torch.Tensor:
        """[rows, len(layers), hidden] states (as `read` pools them) -> [rows] logits."""
        return states.flatten(1).float().to(self.weight.device) @ self.weight + self.bias

    def cost_of_states(self, states: torch.Tensor) -> list[float]:
        return [float(v) for v in COST_SCALE * torch.sigmoid(self.logits_of_states(states))]

    def logits(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        states = answer_states(
            self.lm, prompts, responses, self.layers, reads=(self.read,), batch_size=self.batch_size
        )[self.read][:, 0]
        return self.logits_of_states(states)

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if not prompts:
            return []
        return [float(v) for v in COST_SCALE * torch.sigmoid(self.logits(prompts, responses))]

    def costs_along(
        self, prompts: Sequence[str], responses: Sequence[str], at: Sequence[int | None]
    ) -> torch.Tensor:
        """[pairs, len(at)] costs of each answer's first `at` tokens, one pass per pair: what
        the stream's checks of a finished answer read (calibration's critic targets)."""
        states = answer_states(self.lm, prompts, responses, self.layers, at=at, reads=(self.read,))[
            self.read
        ]
        logits = states.flatten(2).float() @ self.weight + self.bias
        return COST_SCALE * torch.sigmoid(logits)


@dataclass(frozen=True)
class LatentFit:
    """The probe calibration chose, with how each candidate separated `select`."""

    layers: list[int]
    weight: torch.Tensor
    bias: float
    l2: float
    select_auroc: dict[str, float]  # candidate ("L8+12/l2=1") -> mean AUROC over select sets


def fit_latent_probe(
    fit: tuple[torch.Tensor, torch.Tensor],
    select: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    layers: Sequence[int],
    candidates: Sequence[Sequence[int]],
    l2s: Sequence[float],
) -> LatentFit:
    """Fit a logistic probe per (layer set, L2) on `fit` = (states [n, len(layers), hidden],
    unsafe [n]) and keep the one whose AUROC, averaged over the `select` sets (each
    (states, unsafe) with both classes), is highest: chosen on held-aside answers, not on
    the ones it learned from."""
    best: tuple[float, list[int], torch.Tensor, float, float] | None = None
    report = {}
    states, unsafe = fit
    for candidate in candidates:
        idx = [list(layers).index(layer) for layer in candidate]
        x = states[:, idx].flatten(1)
        for l2 in l2s:
            weight, bias = fit_probe(x[unsafe], x[~unsafe], l2=l2)
            scores = []
            for sel_states, sel_unsafe in select.values():
                logits = sel_states[:, idx].flatten(1) @ weight + bias
                scores.append(auroc(logits[sel_unsafe], logits[~sel_unsafe]))
            mean = sum(scores) / len(scores)
            report[f"L{'+'.join(map(str, candidate))}/l2={l2:g}"] = round(mean, 4)
            if best is None or mean > best[0]:
                best = (mean, list(candidate), weight, bias, l2)
    assert best is not None, "no candidate layer set"
    _, chosen, weight, bias, l2 = best
    return LatentFit(chosen, weight, bias, l2, report)


def state_reader(cost: object) -> LatentCost | None:
    """The latent cost model behind `cost` (itself, or inside a score cache), if it is one:
    the worker then records its layers while decoding and scores checks from them."""
    inner = getattr(cost, "model", cost)
    return inner if isinstance(inner, LatentCost) else None


__all__ = [
    "LatentCost",
    "LatentFit",
    "answer_states",
    "fit_latent_probe",
    "pair_ids",
    "state_reader",
]
