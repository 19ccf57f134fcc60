"""Calibration mechanics on a tiny random model: every SSV source, artifacts, errors.

A random model says nothing about safety; these tests check the procedure and its records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.cache.artifacts import DirectoryStore
from guardrail.calibrate import datasets
from guardrail.calibrate.gate import CalibrationConfig, calibrate
from guardrail.calibrate.store import artifact_key, load_or_calibrate
from guardrail.errors import CalibrationError, ModelError
from guardrail.gate.artifact import Calibration


def _config(tmp_path: Path, **overrides: Any) -> CalibrationConfig:
    harmful = datasets.load_many(datasets.default_harmful())[::8]
    harmless = datasets.load_many(datasets.default_harmless())[::16]
    (tmp_path / "harmful.txt").write_text("\n".join(harmful))
    (tmp_path / "harmless.txt").write_text("\n".join(harmless))
    settings: dict[str, Any] = {
        "harmful": [str(tmp_path / "harmful.txt")],
        "harmless": [str(tmp_path / "harmless.txt")],
        "strength_fractions": (0.25, 0.5),
        "dev_harmful": 6,
        "dev_benign": 4,
        "dev_max_new_tokens": 6,
        "token_layers": (),  # the token read has its own test below
        **overrides,
    }
    return CalibrationConfig(**settings)


def _save_tiny(model: Any, tokenizer: Any, folder: Path) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    from conftest import _tiny

    return _tiny("llama")


def test_calibration_records_every_source_and_round_trips(tiny_llama: Any, tmp_path: Path) -> None:
    from conftest import _tiny

    sibling = _tiny("llama")  # same hidden size, different weights: the "aligned" source
    torch.manual_seed(1)
    for parameter in sibling.model.parameters():
        parameter.data.normal_(0, 0.02)
    aligned = _save_tiny(sibling.model, sibling.tokenizer, tmp_path / "aligned")
    config = _config(tmp_path, aligned_model=aligned)
    result = calibrate(tiny_llama, config, progress=False)

    assert set(result.ssvs) == {"srv", "refusal", "aligned"}
    layers = len(result.manifest["residual_norms"])
    for vectors in result.ssvs.values():
        assert vectors.shape == (layers, tiny_llama.hidden_size)
        torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(layers))
    assert result.gate.kind == "probe" and result.srv_gate.kind == "srv"
    assert result.manifest["data"]["harmful"]["hash"] and result.manifest["steering_search"]
    assert {row["source"] for row in result.manifest["steering_search"]} == set(result.ssvs)

    searched = {tuple(row["reads"]) for row in result.manifest["gate_search"]["probe"]}
    assert searched == {tuple(r) for r in config.gate_reads}
    restored = Calibration.from_artifacts(result.to_artifacts())
    assert restored.gate.layers == result.gate.layers
    assert restored.gate.reads == result.gate.reads
    assert restored.gate.threshold == result.gate.threshold
    torch.testing.assert_close(restored.gate.weight, result.gate.weight)
    assert restored.steering == result.steering


def test_store_is_reused_and_keyed_by_data(tiny_llama: Any, tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    config = _config(tmp_path, layer_fractions=(0.5,), strength_fractions=(0.25,))
    first = load_or_calibrate(tiny_llama, config, store=store, progress=False)
    key = artifact_key(tiny_llama, config)
    assert key.startswith(tiny_llama.fingerprint) and (tmp_path / "store" / key).is_dir()
    again = load_or_calibrate(tiny_llama, config, store=store, progress=False)
    assert again.manifest["seconds"] == first.manifest["seconds"]  # read back, not recomputed
    changed = CalibrationConfig(**{**config.__dict__, "target_fpr": 0.05})
    assert artifact_key(tiny_llama, changed) != key


def test_aligned_model_of_another_width_is_rejected(tiny_llama: Any, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tiny_llama.tokenizer),
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    aligned = _save_tiny(wide, tiny_llama.tokenizer, tmp_path / "wide")
    with pytest.raises(ModelError, match="hidden size 48"):
        calibrate(tiny_llama, _config(tmp_path, aligned_model=aligned), progress=False)


def test_too_little_data_is_a_clear_error(tiny_llama: Any, tmp_path: Path) -> None:
    (tmp_path / "few.txt").write_text("one prompt\nanother prompt\n")
    config = _config(tmp_path)
    config.harmful = [str(tmp_path / "few.txt")]
    with pytest.raises(CalibrationError, match="too few harmful prompts"):
        calibrate(tiny_llama, config, progress=False)


def test_artifacts_with_an_unknown_read_are_rejected(tiny_llama: Any, tmp_path: Path) -> None:
    from guardrail.errors import CalibrationError

    config = _config(tmp_path, gate_reads=(("last", "mean"),), strength_fractions=(0.25,))
    artifacts = calibrate(tiny_llama, config, progress=False).to_artifacts()
    assert artifacts.manifest["gate"]["reads"] == ["last", "mean"]
    artifacts.manifest["gate"]["reads"] = ["last", "middle"]
    with pytest.raises(CalibrationError, match="middle"):
        Calibration.from_artifacts(artifacts)
    artifacts.manifest["gate"]["reads"] = ["last"]  # the weight holds two reads
    with pytest.raises(CalibrationError, match="does not fit"):
        Calibration.from_artifacts(artifacts)


def test_suffixes_join_fit_and_contexts_surround_prompts_as_asked(
    tiny_llama: Any, tmp_path: Path
) -> None:
    """With `suffix_share` the `fit` splits (and harmful `select`) grow by the suffixed copies;
    without `context_copies` only the prompts as asked go in contexts, so fewer rows are read
    in contexts than with the copies (the states read are the split plus those in contexts)."""
    base = {"layer_fractions": (0.5,), "strength_fractions": (0.25,), "context_share": 0.5}
    plain = calibrate(tiny_llama, _config(tmp_path, suffix_share=0.0, **base), progress=False)
    suffixed = calibrate(tiny_llama, _config(tmp_path, suffix_share=0.5, **base), progress=False)
    asked = calibrate(
        tiny_llama,
        _config(tmp_path, suffix_share=0.5, context_copies=False, **base),
        progress=False,
    )
    before, after = plain.manifest["data"]["split_sizes"], suffixed.manifest["data"]["split_sizes"]
    for split in ("harmful/fit", "harmless/fit", "harmful/select"):
        assert after[split] > before[split] * 1.3
    assert after["harmless/select"] == before["harmless/select"]
    assert asked.manifest["data"]["split_sizes"] == after
    with_copies, as_asked = (c.manifest["data"]["in_contexts"] for c in (suffixed, asked))
    for split in ("harmful/fit", "harmless/fit", "harmful/select"):
        assert with_copies[split] > as_asked[split] > 0
    assert with_copies["harmless/select"] == as_asked["harmless/select"]
    assert asked.manifest["config"]["context_copies"] is False


def test_token_read_is_fitted_beside_the_pooled_probe_and_round_trips(
    tiny_llama: Any, tmp_path: Path
) -> None:
    """With `token_layers` the gate keeps the pooled probe as fitted without them and adds a
    token read, its threshold set on the higher of the two on harmless `select` prompts
    (the tenant's `target_fpr` reads the same scores); the default key is unchanged by the
    new fields, and the token read survives the artifact round trip."""
    from guardrail.calibrate.token_read import token_layers
    from guardrail.gate.vectors import gate_scores

    base = {"layer_fractions": (0.5,), "strength_fractions": (0.25,)}
    plain = calibrate(tiny_llama, _config(tmp_path, **base), progress=False)
    config = _config(tmp_path, **base, token_layers=(0.0, 0.5), token_l2=(0.01, 0.1))
    both = calibrate(tiny_llama, config, progress=False)
    assert plain.gate.tokens is None and both.gate.tokens is not None
    assert both.gate.tokens.layers == token_layers(tiny_llama, (0.0, 0.5))
    torch.testing.assert_close(both.gate.weight, plain.gate.weight)
    rows = both.manifest["gate_search"]["tokens"]
    assert [r["l2"] for r in rows] == [0.01, 0.1] and sum(r["chosen"] for r in rows) == 1
    assert both.harmless_scores is not None
    assert both.threshold_at(config.target_fpr) == pytest.approx(both.gate.threshold)
    assert artifact_key(tiny_llama, _config(tmp_path, **base)) != artifact_key(tiny_llama, config)
    store = DirectoryStore(tmp_path / "store")
    store.save("k", both.to_artifacts())
    found = store.load("k")
    assert found is not None
    restored = Calibration.from_artifacts(found).gate.tokens
    assert restored is not None and restored.layers == both.gate.tokens.layers
    torch.testing.assert_close(restored.weight, both.gate.tokens.weight)
    assert (restored.bias, restored.shift) == (both.gate.tokens.bias, both.gate.tokens.shift)
    chats = ["How do I bake bread?", "Tell me about cats"]
    again = Calibration.from_artifacts(found).gate
    torch.testing.assert_close(
        gate_scores(tiny_llama, again, chats), gate_scores(tiny_llama, both.gate, chats)
    )


def test_default_token_read_sits_at_the_layers_the_bench_chose(lm: Any) -> None:
    """The default puts the token read at layers 4-20, every 2nd, of SmolLM2's 30
    (bench/eval_gate_reads.py); `--recipe pooled` drops it and the suffixed copies and searches
    the reads it was calibrated with, and the jailbreak recipe runs without it, as measured."""
    from dataclasses import asdict

    from guardrail.calibrate.token_read import token_layers

    default = CalibrationConfig()
    assert token_layers(lm, default.token_layers) == tuple(range(4, 21, 2))
    pooled = CalibrationConfig.pooled_only()
    changed = {k for k, v in asdict(pooled).items() if asdict(default)[k] != v}
    assert changed == {"token_layers", "gate_reads", "suffix_share", "suffix_words"}
    assert not pooled.token_layers
    assert not CalibrationConfig.jailbreak_augmented().token_layers
