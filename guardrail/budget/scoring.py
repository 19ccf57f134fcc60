"""Cost and reward models: small batched protocols and their implementations.

Both score one or many (prompt, response) pairs in one call, because the search scores every
candidate of a round at once. The prompt is the user's request as text (the last user
message), the response is the answer so far (a prefix while generating).

- Cost: `ProbeCost` is the embedded default, a logistic probe on all-MiniLM-L6-v2 embeddings
  of the response, trained by calibration (`guardrail.calibrate.safety`); its cost is
  `COST_SCALE * P(unsafe)`, shifted at calibration so that cost 5 sits at the calibrated
  operating point. `ClassifierCost` plugs in any transformers sequence-classification model
  (a Beaver-style cost model on a GPU) by id or local path.
- Reward: `ProxyReward` is the documented default proxy, relevance plus fluency:
  `cos(embed(prompt), embed(response)) - nll_weight * NLL(response | prompt)`, the NLL under
  the base model with no steering. `ClassifierReward` plugs in a reward model.
- `CachedCost` puts any cost model behind a score cache (memory, disk or Redis), keyed by the
  content hash of what the model reads.
- `answer_costs` scores whole answers offline as the worker's stream check holds them to a
  budget (`guardrail score`): the highest cost of each answer's `checked_texts`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from guardrail.cache.scores import CachedScorer, CountingScores, MemoryScores, ScoreCache
from guardrail.errors import ModelError
from guardrail.runtime.embedder import Embedder
from guardrail.runtime.forward import token_nlls
from guardrail.runtime.model import LanguageModel

COST_SCALE = 10.0
DEFAULT_BUDGET = 5.0  # the calibrated operating point of the default cost model


class CostModel(Protocol):
    """`cost(prompts, responses)`: one float per pair; higher is less safe."""

    name: str
    fingerprint: str
    reads_prompt: bool  # False: the cost depends on the response only (cache by response)

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class RewardModel(Protocol):
    """`reward(prompts, responses)`: one float per pair; higher is more helpful."""

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


@runtime_checkable
class TokenReward(Protocol):
    """A reward whose fluency term reads each answer's mean token NLL: a caller that sampled
    the answer has it from the logits it sampled from, with no pass over prompt + answer."""

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...

    def reward_with_nlls(
        self, prompts: Sequence[str], responses: Sequence[str], nlls: Sequence[float | None]
    ) -> list[float]: ...


class ProbeCost:
    """`COST_SCALE * sigmoid(w . embed(response) + b)`: the embedded default cost model."""

    name = "probe-cost"
    reads_prompt = False

    def __init__(self, embedder: Embedder, weight: torch.Tensor, bias: float) -> None:
        if weight.shape != (embedder.dim,):
            raise ModelError(
                f"cost probe weight has shape {tuple(weight.shape)}, the embedder gives "
                f"{embedder.dim} dimensions"
            )
        self.embedder, self.weight, self.bias = embedder, weight.float(), float(bias)
        digest = torch.cat([self.weight, torch.tensor([self.bias])]).numpy().tobytes()
        self.fingerprint = f"{embedder.fingerprint}-{hashlib.sha256(digest).hexdigest()[:12]}"

    def logits(self, responses: Sequence[str]) -> torch.Tensor:
        return self.embedder.embed(responses) @ self.weight + self.bias

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        values = COST_SCALE * torch.sigmoid(self.logits(responses))
        return [float(v) for v in values]


class _Classifier:
    """A transformers sequence-classification model read at one output (label index)."""

    def __init__(self, source: str | Path, index: int, scale: float, shift: float) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(source)
            self.model: Any = AutoModelForSequenceClassification.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load scorer {str(source)!r}: {exc}".splitlines()[0]) from exc
        self.model.train(False)
        labels = int(self.model.config.num_labels)
        if not -labels <= index < labels:
            raise ModelError(f"{source}: output index {index} outside its {labels} labels")
        self.index, self.scale, self.shift = index, scale, shift
        self.name = f"classifier:{source}"
        self.fingerprint = f"{source}:{index}:{scale}:{shift}"
        self.reads_prompt = True
        self._lock = threading.Lock()  # one call at a time (see `Embedder`)

    @torch.inference_mode()
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        with self._lock:
            batch = self.tokenizer(
                list(prompts), list(responses), padding=True, truncation=True, return_tensors="pt"
            )
            logits = self.model(**batch).logits.float()[:, self.index]
        return [float(v) for v in self.scale * logits + self.shift]


class ClassifierCost(_Classifier):
    """Cost = `scale * logit[index] + shift` of a sequence-classification model over the
    (prompt, response) pair: how Beaver-style cost models plug in."""

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.scores(prompts, responses)


class ClassifierReward(_Classifier):
    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.scores(prompts, responses)


class ProxyReward:
    """Relevance to the prompt plus fluency under the (unsteered) base model.

    A stand-in for a trained reward model on a laptop: it prefers answers that stay on the
    user's topic and read as natural text for this model, and knows nothing about safety
    (that is the cost model's job)."""

    def __init__(
        self, embedder: Embedder, lm: LanguageModel, nll_weight: float = 0.1, batch_size: int = 16
    ) -> None:
        self.embedder, self.lm, self.nll_weight = embedder, lm, nll_weight
        self.batch_size = batch_size

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [r[0] for r in self.reward_prefixes(prompts, [[r] for r in responses])]

    def reward_with_nlls(
        self, prompts: Sequence[str], responses: Sequence[str], nlls: Sequence[float | None]
    ) -> list[float]:
        """`reward` with each response's mean token NLL given (None: computed here), as the
        search reads it from the logits it sampled the tokens from."""
        out: list[float] = [0.0] * len(responses)
        missing = [i for i, nll in enumerate(nlls) if nll is None]
        if missing:
            values = self.reward([prompts[i] for i in missing], [responses[i] for i in missing])
            for i, value in zip(missing, values, strict=True):
                out[i] = value
        known = [i for i, nll in enumerate(nlls) if nll is not None]
        if known:
            relevance = self._relevance([prompts[i] for i in known], [responses[i] for i in known])
            for i, r in zip(known, relevance, strict=True):
                nll = nlls[i]
                assert nll is not None
                out[i] = r - self.nll_weight * nll
        return out

    def _relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """cos(embed(prompt), embed(response)); each distinct prompt embedded once."""
        unique = list(dict.fromkeys(prompts))
        by_prompt = dict(zip(unique, self.embedder.embed(unique), strict=True))
        queries = torch.stack([by_prompt[p] for p in prompts])
        return [float(v) for v in (queries * self.embedder.embed(responses)).sum(-1)]

    def reward_prefixes(
        self, prompts: Sequence[str], prefixes: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """The reward of successive prefixes of each prompt's answer (the last one is the whole
        answer), with one model pass per answer: a prefix's NLL is a slice of the answer's."""
        if not prompts:
            return []
        texts = [t for group in prefixes for t in group]
        queries = [p for p, group in zip(prompts, prefixes, strict=True) for _ in group]
        relevance = iter((self.embedder.embed(queries) * self.embedder.embed(texts)).sum(-1))
        answers = [group[-1] or " " for group in prefixes]
        nlls = [
            nll
            for start in range(0, len(prompts), self.batch_size)
            for nll in token_nlls(
                self.lm,
                prompts[start : start + self.batch_size],
                answers[start : start + self.batch_size],
            )
        ]
        out = []
        for group, nll in zip(prefixes, nlls, strict=True):
            *heads, _ = group  # the whole answer is all of `nll`; a prefix, its first tokens
            encode = self.lm.tokenizer
            counts = [len(encode(t or " ", add_special_tokens=False)["input_ids"]) for t in heads]
            counts.append(len(nll))
            means = [float(nll[:n].mean()) if n else math.inf for n in counts]
            penalties = [self.nll_weight * (m if math.isfinite(m) else 10.0) for m in means]
            out.append([float(next(relevance)) - p for p in penalties])
        return out


class CachedCost:
    """A cost model behind a score cache: each distinct input is scored once per TTL."""

    def __init__(self, model: CostModel, cache: ScoreCache | None = None) -> None:
        self.model = model
        self.name, self.fingerprint, self.reads_prompt = (
            model.name,
            model.fingerprint,
            model.reads_prompt,
        )
        self.cache = CountingScores(cache or MemoryScores())  # hits and misses, for metrics
        self._scorer = CachedScorer(
            self._score, self.cache, name=model.name, fingerprint=model.fingerprint
        )

    def _score(self, keys: Sequence[str]) -> list[list[float]]:
        pairs = [key.split("\x00", 1) for key in keys]
        values = self.model.cost([p for p, _ in pairs], [r for _, r in pairs])
        return [[v] for v in values]

    def cost(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        keys = [
            f"{p if self.reads_prompt else ''}\x00{r}"
            for p, r in zip(prompts, responses, strict=True)
        ]
        return [scores[0] for scores in self._scorer(keys)]


__all__ = [
    "COST_SCALE",
    "DEFAULT_BUDGET",
    "CachedCost",
    "ClassifierCost",
    "ClassifierReward",
    "CostModel",
    "ProbeCost",
    "ProxyReward",
    "RewardModel",
    "TokenReward",
]
