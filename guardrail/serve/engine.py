"""Guarded generation: gate in the prefill, steer or refuse the rows that fire.

One prefill serves everyone: the gate pools its reads of the prompt at the gate layers during
the pass every request needs anyway, so benign rows pay for no extra forward pass and decode
exactly as they would unguarded. Rows that fire are answered by the configured action:
steered generation (a second prefill for those rows only, with steering at every position)
or the refusal text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import torch

from guardrail.decision import DEFAULT_REFUSAL, Answer, Decision, OnFire, resolve_action
from guardrail.gate.artifact import Calibration
from guardrail.gate.readout import read_weights
from guardrail.runtime.forward import Sampling, decode, prefill, steered_generate
from guardrail.runtime.hooks import Pooler
from guardrail.runtime.model import Chat, LanguageModel


class GuardedGenerator:
    """Answers batches of chats under a calibration, with a decision record per answer."""

    def __init__(
        self,
        lm: LanguageModel,
        calibration: Calibration | None,
        *,
        on_fire: OnFire = "auto",
        refusal_text: str = DEFAULT_REFUSAL,
    ) -> None:
        if on_fire not in ("auto", "steer", "refuse"):
            raise ValueError(f"on_fire must be auto, steer or refuse, got {on_fire!r}")
        self.lm = lm
        self.calibration = calibration
        self.refusal_text = refusal_text
        self.action = self._resolve(on_fire)

    def _resolve(self, on_fire: OnFire) -> Literal["steer", "refuse"]:
        return resolve_action(self.calibration, on_fire)

    def generate(
        self, chats: Sequence[Chat | str], sampling: Sampling, *, guarded: bool = True
    ) -> list[Answer]:
        if not chats:
            return []
        prompts = [self.lm.prompt(chat) for chat in chats]
        texts = [p.text for p in prompts]
        if not guarded:
            return self._unguarded(texts, sampling)
        if self.calibration is None:
            raise ValueError("guarded generation needs a calibration")
        gate = self.calibration.gate
        started = time.perf_counter()
        pooler = Pooler(gate.layers)
        pooler.weights = read_weights(prompts, gate.reads, max(len(p.ids) for p in prompts))
        with pooler.applied(self.lm.model):
            state = prefill(self.lm, texts)
        scores = gate.scores(pooler.stacked(gate.layers)).cpu()
        fired = gate.fires(scores)
        prefilled = time.perf_counter()
        plain = decode(self.lm, state, sampling, skip=fired.to(state.next_logits.device))
        decoded = time.perf_counter()
        rows = fired.nonzero().squeeze(-1).tolist()
        steered: dict[int, list[int]] = {}
        setting = self.calibration.steering
        if rows and self.action == "steer" and setting is not None:
            steered_tokens = steered_generate(
                self.lm,
                [texts[i] for i in rows],
                self.calibration.steering_vectors(setting),
                torch.full((len(rows),), setting.strength),
                sampling,
            )
            steered = dict(zip(rows, steered_tokens, strict=True))
        finished = time.perf_counter()
        timings = {
            "prefill": 1000 * (prefilled - started),
            "decode": 1000 * (decoded - prefilled),
            "steered": 1000 * (finished - decoded),
        }
        answers = []
        for row, score in enumerate(scores.tolist()):
            decision = Decision(
                guarded=True,
                gate_score=score,
                threshold=gate.threshold,
                fired=bool(fired[row]),
                path="plain",
                gate_layers=list(gate.layers),
                timings_ms=timings,
                model=self.lm.fingerprint,
            )
            tokens = plain[row]
            if decision.fired:
                decision.path = "steered" if row in steered else "refused"
                decision.steering = setting.as_dict() if row in steered and setting else None
                tokens = steered.get(row, [])
            decision.new_tokens = len(tokens)
            text = self.refusal_text if decision.path == "refused" else self._text(tokens)
            answers.append(Answer(text, decision))
        return answers

    def _unguarded(self, texts: list[str], sampling: Sampling) -> list[Answer]:
        started = time.perf_counter()
        tokens = decode(self.lm, prefill(self.lm, texts), sampling)
        timings = {"total": 1000 * (time.perf_counter() - started)}
        return [
            Answer(
                self._text(row),
                Decision(
                    guarded=False,
                    gate_score=None,
                    threshold=None,
                    fired=False,
                    path="unguarded",
                    new_tokens=len(row),
                    timings_ms=timings,
                    model=self.lm.fingerprint,
                ),
            )
            for row in tokens
        ]

    def _text(self, tokens: list[int]) -> str:
        return str(self.lm.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


__all__ = [
    "GuardedGenerator",
]
