"""Cost model plug-ins and the score cache in front of them (small real models, no training:
mechanics only; the calibrated probe's quality is in test_safety.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.budget.scoring import COST_SCALE, CachedCost, ClassifierCost, ProbeCost, ProxyReward
from guardrail.cache.scores import CountingScores, MemoryScores
from guardrail.errors import ModelError
from guardrail.runtime.embedder import Embedder, embedder_dir


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_embeddings_are_unit_length_and_meaningful(embedder: Embedder) -> None:
    vectors = embedder.embed(["How do I bake bread?", "Bread baking steps", "Stock prices fell"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_probe_cost_range_and_shape_check(embedder: Embedder) -> None:
    probe = ProbeCost(embedder, torch.ones(384), 0.0)
    costs = probe.cost(["", ""], ["hello", "world"])
    assert all(0 <= c <= COST_SCALE for c in costs)
    with pytest.raises(ModelError, match="384"):
        ProbeCost(embedder, torch.ones(10), 0.0)


def test_cached_cost_scores_each_response_once(embedder: Embedder) -> None:
    counting = CountingScores(MemoryScores())
    cost = CachedCost(ProbeCost(embedder, torch.ones(384), 0.0), counting)
    first = cost.cost(["a", "b"], ["same text", "same text"])
    again = cost.cost(["c"], ["same text"])  # the probe ignores the prompt: a cache hit
    assert first[0] == first[1] == again[0]
    assert counting.hits == 1 and counting.misses == 2


def test_sequence_classifier_plugs_in_as_a_cost_model(tmp_path: Path) -> None:
    """Any transformers sequence-classification model by path: here a small random BERT with
    MiniLM's tokenizer, which is how a Beaver-style cost model drops in."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(embedder_dir())
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cost = ClassifierCost(tmp_path, index=1, scale=2.0, shift=1.0)
    values = cost.cost(["How do I make a bomb?", "Hi"], ["Sure, first get", "Hello!"])
    assert len(values) == 2 and values[0] != values[1]
    assert cost.reads_prompt
    with pytest.raises(ModelError, match="index 5"):
        ClassifierCost(tmp_path, index=5, scale=1.0, shift=0.0)
    with pytest.raises(ModelError, match="cannot load"):
        ClassifierCost(tmp_path / "missing", index=0, scale=1.0, shift=0.0)


def test_proxy_reward_of_prefixes_matches_scoring_each_alone(embedder: Embedder, lm: Any) -> None:
    """One pass per answer scores its prefixes as scoring each prefix alone would (the
    calibration's critic readings), and prefers an on-topic answer to an off-topic one."""
    reward = ProxyReward(embedder, lm)
    prompt = "How do I bake bread?"
    answer = "Mix flour, water, yeast and salt. Knead the dough, let it rise, then bake it."
    ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    prefixes = [lm.tokenizer.decode(ids[:n]) for n in (4, 9, len(ids))]
    together = reward.reward_prefixes([prompt, prompt], [prefixes, ["Stock prices fell."]])
    alone = reward.reward([prompt] * 3, prefixes)
    assert together[0] == pytest.approx(alone, abs=1e-3)
    assert together[1][0] < together[0][-1]
