"""Every forward pass the worker and the search run, and so every device and dtype decision.

The scheduler (`guardrail.serve.scheduler`) decides which rows run; this module runs them:
the prefill with the gate's read-out, the steered prefill, one decode step for a batch (with
per-row steering and the latent cost model's state reads), the search's forks of a row's
KV cache and its sampling, and the critic's reads. Whatever reaches the model (token ids,
steering vectors and coefficients, pooling weights, penalties, a critic) is moved to the
model's device, and floating tensors to its dtype, here and nowhere else; what comes back
for scoring (logits, read-outs, hidden states) is float32. So a model in bfloat16, or on a
GPU, runs the same code (tests/test_executor.py runs the worker in bfloat16 on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from guardrail.runtime.forward import Prefilled, Sampling, pick_rows, select_rows
from guardrail.runtime.hooks import Pooler, Recorder, Steering, TokenScorer
from guardrail.runtime.model import LanguageModel


@dataclass
class Pass:
    """A forward pass's outcome: the state to continue from, and what was read on the way."""

    state: Prefilled
    pooled: dict[str, torch.Tensor] | None = None  # per read: [rows, layers, hidden]
    recorded: torch.Tensor | None = None  # [rows, layers, hidden] at the last position
    hidden: torch.Tensor | None = None  # [rows, hidden]: the last layer at the last position
    logprobs: torch.Tensor | None = None  # [rows, positions]: of each fed token after the first
    token_sums: torch.Tensor | None = None  # [rows]: a token read's highest per-token sum


class Executor:
    """Runs one model's forward passes for the worker and the search."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        parameter = next(lm.model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.pad = int(lm.tokenizer.pad_token_id)
        self._critics: set[int] = set()

    # --- tensors -----------------------------------------------------------------------------

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """On the model's device; floating tensors in the model's dtype."""
        if tensor.is_floating_point():
            return tensor.to(device=self.device, dtype=self.dtype)
        return tensor.to(self.device)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def steering(
        self, per_row: Sequence[Mapping[int, torch.Tensor]], coefficients: Sequence[float]
    ) -> Steering | None:
        """Each row's own steering vectors (zero where a row has none at a layer) and its
        coefficient (0: untouched); None when no row is steered."""
        if not any(coefficients):
            return None
        layers = sorted({layer for vectors in per_row for layer in vectors})
        zero = torch.zeros(self.lm.hidden_size, device=self.device, dtype=self.dtype)
        steering = Steering(
            {
                layer: torch.stack([self.put(v[layer]) if layer in v else zero for v in per_row])
                for layer in layers
            }
        )
        steering.coefficients = torch.tensor(
            list(coefficients), device=self.device, dtype=self.dtype
        )
        return steering

    def _hooks(
        self, steering: Steering | None, *others: Pooler | Recorder | TokenScorer | None
    ) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if steering is not None:
            stack.enter_context(steering.applied(self.lm.model))
        for hook in others:
            if hook is not None:
                stack.enter_context(hook.applied(self.lm.model))
        return stack

    # --- forward passes ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        ids: Sequence[Sequence[int]],
        *,
        pool: tuple[Sequence[int], Mapping[str, torch.Tensor]] | None = None,
        tokens: tuple[Mapping[int, torch.Tensor], torch.Tensor] | None = None,
        steering: Steering | None = None,
        hidden: bool = False,
        logprobs: int = 0,
    ) -> Pass:
        """Run left-padded prompts once. `pool`: (layers, per-read [rows, positions] weights)
        of a read-out taken in this pass; `tokens`: (layer -> weight, [rows, positions] span)
        of a per-token read-out kept at its highest in the span; `logprobs`: the
        log-probability of each of the last `logprobs` ids (a prefix the search continues)."""
        width = max(len(row) for row in ids)
        input_ids = torch.tensor(
            [[self.pad] * (width - len(row)) + list(row) for row in ids], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(row)) + [1] * len(row) for row in ids], device=self.device
        )
        pooler = Pooler(pool[0] if pool else [])
        if pool is not None:
            pooler.weights = {read: self.put(w) for read, w in pool[1].items()}
        scorer = None
        if tokens is not None:
            scorer = TokenScorer({layer: self.put(w) for layer, w in tokens[0].items()})
            scorer.span = tokens[1].to(self.device)
        with self._hooks(steering, pooler, scorer):
            out = self.lm.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                output_hidden_states=hidden,
                logits_to_keep=logprobs + 1,
            )
        logits = out.logits.float()
        result = Pass(Prefilled(out.cache, mask, logits[:, -1, :]))
        if pool is not None:
            result.pooled = {r: s.float() for r, s in pooler.stacked(pool[0]).items()}
        if scorer is not None:
            result.token_sums = scorer.scores()
        if hidden:
            result.hidden = out.hidden_states[-1][:, -1].float()
        if logprobs:
            fed = input_ids[:, width - logprobs :]
            result.logprobs = (
                torch.log_softmax(logits[:, :-1], -1).gather(-1, fed[..., None]).squeeze(-1)
            )
        return result

    @torch.inference_mode()
    def step(
        self,
        state: Prefilled,
        tokens: torch.Tensor,
        *,
        steering: Steering | None = None,
        record: Sequence[int] = (),
        hidden: bool = False,
    ) -> Pass:
        """Feed one token per row. `record`: layers whose state at the fed token is read (the
        latent cost model's); `hidden`: the last layer's too (the critic's h)."""
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(len(tokens), 1)], -1)
        recorder = Recorder(record)
        # Without padding one new token attends to every position: no mask, so attention
        # reads grouped key/value heads as they are (with a mask they are copied per head).
        padded = not bool(state.attention_mask.all())
        with self._hooks(steering, recorder):
            out = self.lm.model(
                input_ids=self.put(tokens)[:, None],
                attention_mask=mask if padded else None,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                cache=state.cache,
                use_cache=True,
                output_hidden_states=hidden,
            )
        result = Pass(Prefilled(out.cache, mask, out.logits[:, -1, :].float()))
        if record:
            result.recorded = torch.stack([recorder.states[i] for i in record], dim=1).float()
        if hidden:
            result.hidden = out.hidden_states[-1][:, -1].float()
        return result

    # --- rows ----------------------------------------------------------------------------------

    @staticmethod
    def take(state: Prefilled, rows: Sequence[int]) -> Prefilled:
        """A new state with `rows` of `state` (which is left as it was)."""
        tensors = {
            id(t): t
            for layer in getattr(state.cache, "layers", [])
            for t in (
                getattr(layer, "keys", None),
                getattr(layer, "values", None),
                *getattr(layer, "room", ()),
            )
            if t is not None
        }
        cache = copy.deepcopy(state.cache, memo=dict(tensors))  # the structure, not the data
        return Executor.select(Prefilled(cache, state.attention_mask, state.next_logits), rows)

    @staticmethod
    def select(state: Prefilled, rows: Sequence[int]) -> Prefilled:
        """`select_rows`, in place, releasing any room `reserve` made."""
        selected = select_rows(state, rows)
        for layer in getattr(selected.cache, "layers", []):
            for name in ("room", "update"):
                layer.__dict__.pop(name, None)
        return selected

    @staticmethod
    def reserve(state: Prefilled, room: int) -> Prefilled:
        """Give each layer of `state`'s cache room for `room` more positions, so the next
        decode steps write their keys and values in place instead of copying the whole cache
        at every token (the search's forks: many rows over one long prompt). Any other change
        to the cache (rows selected, joined) falls back to the usual growth."""
        for layer in getattr(state.cache, "layers", []):
            keys = getattr(layer, "keys", None)
            if keys is None or not keys.numel() or room <= 0:
                continue
            rows, heads, length, _ = keys.shape
            key_room = keys.new_empty(rows, heads, length + room, keys.shape[-1])
            value_room = layer.values.new_empty(rows, heads, length + room, layer.values.shape[-1])
            key_room[:, :, :length] = keys
            value_room[:, :, :length] = layer.values
            layer.keys, layer.values = key_room[:, :, :length], value_room[:, :, :length]
            layer.room = (key_room, value_room)
            layer.update = types.MethodType(_update_in_place, layer)
        return state

    @staticmethod
    def drop_last(state: Prefilled, positions: int) -> Prefilled:
        """Forget the last `positions` fed tokens of every row (the logits go stale: feed the
        last kept token again to read them)."""
        if positions <= 0:
            return state
        for layer in getattr(state.cache, "layers", []):
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[:, :, :-positions]
                layer.values = layer.values[:, :, :-positions]
        return Prefilled(state.cache, state.attention_mask[:, :-positions], state.next_logits)

    # --- sampling ------------------------------------------------------------------------------

    def pick(
        self,
        logits: torch.Tensor,
        samplings: Sequence[Sampling],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        return pick_rows(logits, samplings, generators)

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's log-probability of its token under the logits it was picked from."""
        return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)

    def sample(
        self,
        logits: torch.Tensor,
        *,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
        penalised: Sequence[int] = (),
        penalty: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one token per row from `logits` lowered by `penalty` at `penalised` ids;
        returns the tokens and their log-probabilities under the logits themselves."""
        shifted = logits
        if penalised:
            lowered = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
            lowered[list(penalised)] = penalty
            shifted = logits - lowered
        probs = torch.softmax(shifted / max(temperature, 1e-4), dim=-1)
        if top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return tokens, self.logprobs(logits, tokens)

    # --- the critic ----------------------------------------------------------------------------

    @torch.inference_mode()
    def critic_values(self, critic: nn.Module, h: torch.Tensor, z: Sequence[float]) -> list[float]:
        """The critic's reads of hidden states `h` at safety states `z` (the critic runs in
        float32 on the model's device)."""
        if id(critic) not in self._critics:
            critic.to(self.device)
            self._critics.add(id(critic))
        values = critic(h.float().to(self.device), torch.tensor(list(z), device=self.device))
        return [float(v) for v in values]


def _update_in_place(
    layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's `update` that writes into the room `Executor.reserve` made, while the
    layer's keys are still the start of that room; else the layer's own update."""
    key_room, value_room = layer.room
    length, new = layer.keys.shape[-2], key_states.shape[-2]
    if (
        layer.keys.data_ptr() == key_room.data_ptr()
        and layer.keys.shape[0] == key_room.shape[0] == key_states.shape[0]
        and length + new <= key_room.shape[-2]
    ):
        key_room[:, :, length : length + new] = key_states
        value_room[:, :, length : length + new] = value_states
        layer.keys = key_room[:, :, : length + new]
        layer.values = value_room[:, :, : length + new]
        return layer.keys, layer.values
    del layer.update, layer.room  # back to the class's growth by concatenation
    keys, values = layer.update(key_states, value_states, *args, **kwargs)
    return keys, values


__all__ = ["Executor", "Pass"]
