"""Model runtime: load a causal LM with its tokenizer and chat template, and fingerprint it.

Everything else in the guard talks to a `LanguageModel`, so the loading rules (hub id, local
directory, GGUF file, the embedded default) live in one place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardrail.errors import ModelError

Message = dict[str, str]
Chat = Sequence[Message]

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text and ids, the token span [start, end) of the last user
    message, and `end`, the number of tokens before any response prefix."""

    text: str
    ids: list[int]
    user: tuple[int, int]
    end: int


def last_user_message(chat: Chat | str) -> str:
    """The content of the last user turn ('' when there is none)."""
    if isinstance(chat, str):
        return chat
    return next((m.get("content", "") for m in reversed(chat) if m.get("role") == "user"), "")


@dataclass
class LanguageModel:
    """A loaded causal LM, its tokenizer and a fingerprint that keys calibration artifacts."""

    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer, left-padding
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return torch.device(next(self.model.parameters()).device)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a turn: the tokenizer's EOS plus the generation config's."""
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return sorted(ids)

    def format_chat(self, chat: Chat | str, response_prefix: str = "") -> str:
        """Render messages with the model's chat template, ready for the assistant to answer."""
        messages = [{"role": "user", "content": chat}] if isinstance(chat, str) else list(chat)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:  # base models without a template: a plain transcript
            turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            text = "\n".join(turns) + "\nAssistant:"
        return str(text) + response_prefix

    def prompt(self, chat: Chat | str, response_prefix: str = "") -> Prompt:
        """The rendered prompt with its token ids and where the last user message sits in them,
        so a read-out can pool over the request itself rather than the template around it."""
        text = self.format_chat(chat)
        content = last_user_message(chat).strip()
        start = text.rfind(content) if content else -1
        encoded = self.tokenizer(
            text + response_prefix,
            add_special_tokens=False,
            return_offsets_mapping=bool(self.tokenizer.is_fast),
        )
        ids = list(encoded["input_ids"])
        end = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        span = (max(end - 1, 0), max(end, 1))  # unknown: the last prompt token alone
        if start >= 0 and "offset_mapping" in encoded:
            stop = start + len(content)
            inside = [
                i
                for i, (a, b) in enumerate(encoded["offset_mapping"][:end])
                if a < stop and b > start
            ]
            if inside:
                span = (inside[0], inside[-1] + 1)
        return Prompt(text + response_prefix, ids, span, end)

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize a left-padded batch on the model's device."""
        batch = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, add_special_tokens=False
        )
        return {k: v.to(self.device) for k, v in batch.items()}


def load_model(name: str = EMBEDDED_DEFAULT, *, gguf_file: str | None = None) -> LanguageModel:
    """Load by Hugging Face id, local directory, path to a `.gguf` file, or the embedded default.

    Nothing is downloaded when `HF_HUB_OFFLINE` is set; an id that is neither local nor in the
    Hugging Face cache fails with a `ModelError` that names it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == EMBEDDED_DEFAULT:
        from guardrail.runtime.embedded import embedded_model_dir

        source: str | Path = embedded_model_dir()
    elif name.endswith(".gguf") and Path(name).is_file():
        source, gguf_file = Path(name).parent, Path(name).name
    else:
        source = name
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}".splitlines()[0]) from exc
    model.train(False)  # inference mode: no dropout
    return wrap_model(model, tokenizer, name=name)


def wrap_model(model: nn.Module, tokenizer: Any, *, name: str) -> LanguageModel:
    """Prepare an already-built model and tokenizer (left padding, a pad token) for the guard."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(
        name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint(model)
    )


def fingerprint(model: nn.Module) -> str:
    """A short stable id of the weights: config plus a sample of every tensor's bytes.

    Hashing every byte of a multi-GB model at each start would be slow; a sample of each tensor
    (first and last 4 KiB) plus names, shapes and the config changes whenever the weights do
    in practice (fine-tunes touch every layer).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        keys = sorted(
            k for k in config.to_dict() if not k.startswith("_") and k != "transformers_version"
        )
        digest.update(json.dumps({k: str(config.to_dict()[k]) for k in keys}).encode())
    for param_name, tensor in model.state_dict().items():
        raw = tensor.detach().reshape(-1).to("cpu").contiguous().view(torch.uint8)
        digest.update(f"{param_name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(raw[:4096].numpy().tobytes())
        digest.update(raw[-4096:].numpy().tobytes())
    return digest.hexdigest()[:16]
