"""The InferAligner harmful-intent gate: a linear read-out of the prompt's activations.

InferAligner projects the last prompt token's activation at one layer onto the unit
safety-related vector (SRV) and adds a bias. On SmolLM2 that single direction separates
harmful from harmless prompts poorly, and a jailbreak template between the request and the
last token hides it further, so calibration also fits a regularised logistic probe on
several reads (positions) at several layers. Both are a direction plus a bias, read in the
prefill pass, and both are reported side by side. The threshold is always set on prompts
the read-out was not fitted on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from guardrail.runtime.model import Prompt

# Positions a read-out can pool, per prompt: the last token before the answer, the last token
# of the user's message (harmfulness is read best there, before the template's closing
# tokens), and the mean over the user's message (a wrapper cannot move the request out of it).
READS = ("last", "inst", "mean")


def read_weights(
    prompts: Sequence[Prompt], reads: Sequence[str], width: int, skip: int = 0
) -> dict[str, torch.Tensor]:
    """Per read, [rows, width] pooling weights for these prompts left-padded to `width` after
    their first `skip` tokens (a shared prefix run earlier)."""
    unknown = set(reads) - set(READS)
    if unknown:
        raise ValueError(f"unknown read(s) {sorted(unknown)}; known: {list(READS)}")
    out = {read: torch.zeros(len(prompts), width) for read in reads}
    for row, prompt in enumerate(prompts):
        pad = width - (len(prompt.ids) - skip)  # column of token p is pad + p - skip
        start, stop = prompt.user
        spans = {
            "last": (prompt.end - 1, prompt.end),
            "inst": (stop - 1, stop),
            "mean": (max(start, skip), stop),
        }
        for read in reads:
            a, b = spans[read]
            a, b = max(a, skip), max(b, a + 1)
            out[read][row, pad + a - skip : pad + b - skip] = 1.0 / (b - a)
    return out


def token_span(prompts: Sequence[Prompt], width: int, skip: int = 0) -> torch.Tensor:
    """[rows, width] True from each prompt's user turn to its last prompt token (the template
    after the request included), for prompts left-padded to `width` after `skip` tokens."""
    span = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        pad = width - (len(prompt.ids) - skip)
        start = max(prompt.user[0], skip)
        span[row, pad + start - skip : pad + prompt.end - skip] = True
    return span


@dataclass
class TokenRead:
    """A per-token probe kept at its highest over the user's turn and the template after it
    (see `hooks.TokenScorer`), moved onto the pooled probe's scale by `shift`: beside the
    pooled read, it catches a request that a suffix or a template's closing text hides from
    the last token (bench/eval_gate_reads.py)."""

    layers: tuple[int, ...]
    weight: torch.Tensor  # [len(layers) * hidden]
    bias: float
    shift: float = 0.0

    def per_layer(self) -> dict[int, torch.Tensor]:
        """The weight split by layer: layer -> [hidden]."""
        return dict(zip(self.layers, self.weight.view(len(self.layers), -1), strict=True))

    def scores(self, sums: torch.Tensor) -> torch.Tensor:
        """On the pooled scale, from the scorer's highest per-token sums: [rows]."""
        return sums.float() + self.bias + self.shift


@dataclass
class Gate:
    """score = concat(h[read][l] for read in reads for l in layers) · weight + bias, or with
    a token read, the higher of that and the token read's score; fires when score > threshold."""

    layers: tuple[int, ...]
    weight: torch.Tensor  # [len(reads) * len(layers) * hidden]
    bias: float
    threshold: float
    kind: str = "probe"  # "probe" or "srv"
    reads: tuple[str, ...] = ("last",)
    tokens: TokenRead | None = None

    def features(self, states: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[rows, features] from per-read states at the gate's layers [rows, layers, hidden]."""
        return torch.cat([states[read].flatten(1) for read in self.reads], dim=1).float()

    def scores(
        self, states: Mapping[str, torch.Tensor], token_sums: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores from per-read states at the gate's layers: [rows, len(layers), hidden], and
        with a token read, its scorer's sums: [rows]."""
        flat = self.features(states)
        pooled = flat @ self.weight.to(flat.device).float() + self.bias
        if self.tokens is None:
            return pooled
        if token_sums is None:
            raise ValueError("this gate has a token read: pass its scorer's sums")
        return torch.maximum(pooled, self.tokens.scores(token_sums.to(pooled.device)))

    def read(self, all_layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores from per-read states at every layer: [rows, layers, hidden]."""
        return self.scores({r: all_layers[r][:, list(self.layers)] for r in self.reads})

    def fires(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold
