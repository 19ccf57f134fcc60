"""The calibrated InferenceGuard parts as stored: both cost probes, the critic, the manifest.

Calibration (`guardrail.calibrate.safety`) writes them; workers read them back and turn them
into the `Scorers` the search and the cost checks use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.budget.critic import Critic
from guardrail.budget.latent import LatentCost
from guardrail.budget.scoring import CachedCost, CostModel, ProbeCost, ProxyReward
from guardrail.budget.search import Scorers
from guardrail.cache.artifacts import Artifacts
from guardrail.cache.scores import MemoryScores, ScoreCache
from guardrail.errors import CalibrationError
from guardrail.runtime.embedder import Embedder
from guardrail.runtime.model import LanguageModel

SAFETY_SCHEMA = 4  # 2: the critic reads z = budget - path cost; 3: it learns a correction;
# 4: the latent cost model beside the MiniLM probe, both trained on human-labelled answers too
CALIBRATED_COSTS = ("latent", "minilm")  # the cost models calibration trains


@dataclass
class SafetyModels:
    """The calibrated cost probe and critic, and the manifest that says how they measured."""

    probe_weight: torch.Tensor
    probe_bias: float
    critic: Critic
    manifest: dict[str, Any] = field(default_factory=dict)
    latent_weight: torch.Tensor | None = None
    latent_bias: float = 0.0
    latent_layers: list[int] = field(default_factory=list)
    latent_read: str = "mean"
    cost_model: str = "minilm"  # which of the two `scorers()` serves by default

    def cost(
        self, lm: LanguageModel, which: str | None = None, embedder: Embedder | None = None
    ) -> CostModel:
        """The calibrated cost model `which` ("latent" or "minilm"; None: the default)."""
        which = which or self.cost_model
        if which == "latent":
            if self.latent_weight is None:
                raise CalibrationError("this calibration has no latent cost model")
            return LatentCost(
                lm, self.latent_layers, self.latent_weight, self.latent_bias, read=self.latent_read
            )
        if which != "minilm":
            raise CalibrationError(
                f"unknown cost model {which!r}; known: {', '.join(CALIBRATED_COSTS)}"
            )
        return ProbeCost(embedder or Embedder(), self.probe_weight, self.probe_bias)

    def scorers(
        self,
        lm: LanguageModel,
        embedder: Embedder | None = None,
        cache: ScoreCache | None = None,
        *,
        cost: str | None = None,
    ) -> Scorers:
        """Cost (behind the score cache), proxy reward and critic, ready for the worker. The
        critic learned the default cost model's scale: with the other, the search ranks by
        reward and cost instead."""
        embedder = embedder or Embedder()
        model = self.cost(lm, cost, embedder)
        reward = ProxyReward(embedder, lm, self.manifest.get("config", {}).get("nll_weight", 0.1))
        cached = CachedCost(model, cache or MemoryScores())
        critic = self.critic if (cost or self.cost_model) == self.cost_model else None
        alternatives: dict[str, CostModel] = {(cost or self.cost_model): cached}
        for name in CALIBRATED_COSTS:
            if name not in alternatives and (name != "latent" or self.latent_weight is not None):
                alternatives[name] = CachedCost(self.cost(lm, name, embedder), cached.cache.inner)
        return Scorers(cost=cached, reward=reward, critic=critic, alternatives=alternatives)

    def to_artifacts(self) -> Artifacts:
        tensors = {"probe.weight": self.probe_weight}
        if self.latent_weight is not None:
            tensors["latent.weight"] = self.latent_weight
        tensors.update({f"critic.{k}": v for k, v in self.critic.state_dict().items()})
        manifest = {
            **self.manifest,
            "schema_version": SAFETY_SCHEMA,
            "probe_bias": self.probe_bias,
            "critic_width": self.critic.width,
            "latent": {
                "bias": self.latent_bias,
                "layers": self.latent_layers,
                "read": self.latent_read,
            },
            "cost_model": self.cost_model,
        }
        return Artifacts(tensors=tensors, manifest=manifest)

    @classmethod
    def from_artifacts(cls, artifacts: Artifacts) -> SafetyModels:
        m, t = artifacts.manifest, artifacts.tensors
        if m.get("schema_version") != SAFETY_SCHEMA:
            raise CalibrationError(f"safety schema {m.get('schema_version')} != {SAFETY_SCHEMA}")
        try:
            state = {k.removeprefix("critic."): v for k, v in t.items() if k.startswith("critic.")}
            critic = Critic(state["h_mean"].shape[0], int(m["critic_width"]))
            critic.load_state_dict(state)
            critic.train(False)
            latent = m["latent"]
            return cls(
                t["probe.weight"],
                float(m["probe_bias"]),
                critic,
                m,
                latent_weight=t.get("latent.weight"),
                latent_bias=float(latent["bias"]),
                latent_layers=[int(i) for i in latent["layers"]],
                latent_read=str(latent["read"]),
                cost_model=str(m["cost_model"]),
            )
        except (KeyError, RuntimeError) as exc:
            raise CalibrationError(f"incomplete safety artifacts: {exc}") from exc


__all__ = ["CALIBRATED_COSTS", "SAFETY_SCHEMA", "SafetyModels"]
