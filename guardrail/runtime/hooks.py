"""Removable forward hooks on decoder layers: read hidden states, add steering vectors.

The model is never mutated: every hook is registered inside a context manager and removed on
exit, as in the steering-vectors library. "Layer l" always means the residual stream at the
output of decoder layer l (0-based), i.e. `hidden_states[l + 1]` in transformers' terms.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from guardrail.errors import ModelError

# Attribute paths of the decoder layer list in the model families we know.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, SmolLM, Gemma
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "transformer.blocks",  # MPT
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, or a `ModelError` naming the class we could not read."""
    for path in _LAYER_PATHS:
        node: Any = model
        for attr in path.split("."):
            node = getattr(node, attr, None)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}; "
        f"supported layouts: {', '.join(_LAYER_PATHS)}"
    )


class _Enough(Exception):
    """Raised by `stopped_after`'s hook: the layers a reader needs have run."""


@contextmanager
def stopped_after(model: nn.Module, layer: int) -> Iterator[None]:
    """Forward passes inside end after decoder layer `layer`: a reader of layers up to it
    skips the rest of the model (and its logits). Nothing after that layer is computed."""

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _Enough

    handle = decoder_layers(model)[layer].register_forward_hook(stop)
    try:
        with suppress(_Enough):
            yield
    finally:
        handle.remove()


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[no-any-return]


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Steering:
    """Add `coefficients[row] * vector` at every position of each steered layer.

    `coefficients` holds one value per batch row; a row with 0 is left bit-for-bit untouched,
    so steered and unsteered requests can share one batch. Set it before each forward pass
    whose batch size changes. A layer's vector is [hidden] (shared by all rows) or
    [rows, hidden] (each row its own, so tenants with other steering share the batch).
    """

    def __init__(self, vectors: Mapping[int, torch.Tensor]) -> None:
        self.vectors = dict(vectors)
        self.coefficients: torch.Tensor | None = None

    def _hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            coef = self.coefficients
            if coef is None or not bool(coef.any()):
                return output
            hidden = _hidden(output)
            rows = coef.nonzero().squeeze(-1)
            vector = self.vectors[layer].to(hidden.dtype)
            if vector.dim() == 2:  # one vector per row
                vector = vector[rows][:, None, :]
            shift = coef[rows].to(hidden.dtype)[:, None, None] * vector
            steered = hidden.clone()
            steered[rows] = hidden[rows] + shift
            return _replace_hidden(output, steered)

        return hook

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[Steering]:
        with _hooked(model, list(self.vectors), self._hook):
            yield self


class TokenScorer:
    """A per-token linear read-out summed over layers, kept at its highest over a span of
    each row's positions: max over t in span of (sum over l of h_l[t] . w_l).

    A causal model's state at a token depends only on the tokens before it, so what a
    jailbreak appends after a request (a suffix, the rest of a template) cannot change the
    states over the request: the max still reads it there. `span` is [rows, positions] (True
    where a row is read), set before each pass; each row reads its own positions only.
    """

    def __init__(self, weights: Mapping[int, torch.Tensor]) -> None:
        self.weights = dict(weights)  # layer -> [hidden]
        self.span: torch.Tensor | None = None
        self._first = min(self.weights)  # a pass starts there
        self._sums: torch.Tensor | None = None

    def _hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = _hidden(output).detach()
            part = (hidden @ self.weights[layer].to(hidden)).float()
            sums = None if layer == self._first else self._sums
            self._sums = part if sums is None else sums + part

        return hook

    def scores(self) -> torch.Tensor:
        """The last pass's highest per-token score in each row's span: [rows]."""
        if self._sums is None or self.span is None:
            raise RuntimeError("TokenScorer.scores before a pass with a span")
        span = self.span.to(self._sums.device)
        return self._sums.masked_fill(~span, float("-inf")).amax(-1)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[TokenScorer]:
        with _hooked(model, sorted(self.weights), self._hook):
            yield self


@contextmanager
def _hooked(model: nn.Module, layers: Sequence[int], make: Any) -> Iterator[None]:
    """Register `make(layer)` as a forward hook on each layer; remove them all on exit."""
    modules = decoder_layers(model)
    for i in layers:
        if not 0 <= i < len(modules):
            raise ValueError(f"layer {i} out of range: the model has {len(modules)} layers")
    handles = [modules[i].register_forward_hook(make(i)) for i in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Recorder:
    """Keep the hidden state of the last position (or, with `all_positions`, of every position)
    at chosen layers, one tensor per forward pass."""

    def __init__(self, layers: Sequence[int], *, all_positions: bool = False) -> None:
        self.layers = list(layers)
        self.all_positions = all_positions
        self.states: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = _hidden(output).detach()
            self.states[layer] = hidden if self.all_positions else hidden[:, -1, :]

        return hook

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[Recorder]:
        with _hooked(model, self.layers, self._hook):
            yield self


class Pooler:
    """Weighted sums of each row's hidden states over positions, at chosen layers.

    `weights[read]` is [rows, positions] for the coming pass: a one-hot row reads one token
    (the last, or the last of the user's message), a uniform one averages a span. Several
    reads come out of one pass, each row from its own positions only, so rows are
    independent of what they are batched with. `states[read][layer]` is [rows, hidden].
    """

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.weights: dict[str, torch.Tensor] = {}
        self.states: dict[str, dict[int, torch.Tensor]] = {}

    def _hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = _hidden(output).detach()
            for read, weight in self.weights.items():
                pooled = torch.einsum("rs,rsh->rh", weight.to(hidden), hidden)
                self.states.setdefault(read, {})[layer] = pooled

        return hook

    def stacked(self, layers: Sequence[int]) -> dict[str, torch.Tensor]:
        """Per read, the states of the last pass at `layers`: [rows, len(layers), hidden]."""
        return {
            read: torch.stack([by_layer[i] for i in layers], dim=1)
            for read, by_layer in self.states.items()
        }

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[Pooler]:
        with _hooked(model, self.layers, self._hook):
            yield self
