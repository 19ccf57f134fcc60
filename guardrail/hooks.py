"""Removable forward hooks on decoder layers: read hidden states, add steering vectors.

The model is never mutated: every hook is registered inside a context manager and removed on
exit, as in the steering-vectors library. "Layer l" always means the residual stream at the
output of decoder layer l (0-based), i.e. `hidden_states[l + 1]` in transformers' terms.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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
        layers = decoder_layers(model)
        handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.vectors]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class Recorder:
    """Keep the hidden state of the last position at chosen layers, one tensor per forward pass.

    The last position of a left-padded prompt is its last real token, which is what the gate
    and the safety-related vectors read. `offsets[row]` reads that many positions earlier
    (a prompt followed by a response prefix); `all_positions=True` keeps every position.
    """

    def __init__(self, layers: Sequence[int], *, all_positions: bool = False) -> None:
        self.layers = list(layers)
        self.all_positions = all_positions
        self.offsets: torch.Tensor | None = None
        self.states: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = _hidden(output).detach()
            if self.all_positions:
                self.states[layer] = hidden
            elif self.offsets is not None:
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                self.states[layer] = hidden[rows, -1 - self.offsets.to(hidden.device)]
            else:
                self.states[layer] = hidden[:, -1, :]

        return hook

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[Recorder]:
        layers = decoder_layers(model)
        for i in self.layers:
            if not 0 <= i < len(layers):
                raise ValueError(f"layer {i} out of range: the model has {len(layers)} layers")
        handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
