"""InferenceGuard's calibrated parts: the two cost probes and the latent critic.

They learn from the target model's own rollouts on the calibration splits (see `datasets`),
and the cost probes also from the shipped human-labelled answers (`labelled.shipped`):

- rollouts: sampled answers to harmful prompts (plain, and steered when calibration chose a
  steering setting) and to harmless prompts, read every `critic_every` tokens (the stream's
  checks fall every `chunk_tokens`);
- cost probes (`fit`): a compliant answer to a harmful prompt is unsafe; a refusal, and any
  answer to a harmless prompt, is safe; AdvBench's harmful strings and its behaviours'
  "Sure, here is ..." targets add unsafe text; so do the labelled answers' own labels. The
  MiniLM probe reads the answer's embedding; the latent probe the model's states over
  (prompt, answer), its layers and L2 chosen by AUROC on the labelled `select` answers.
  Each probe's bias is then shifted on `select` harmless rollouts so that
  `target_search_rate` of harmless answers ever cross cost `DEFAULT_BUDGET` at a chunk
  boundary: the default budget is that operating point. `cost_model` says which one serves
  by default (and trains the critic);
- critic (`fit`): every `critic_every` tokens, inputs (h, z = d - path cost, the highest
  cost at the stream's checks up to there and there) for several budgets d; the value is the
  discounted augmented return (the proxy reward of the finished rollout when its path cost
  stays within d to the end, `unsafe_value` otherwise) and the critic learns its difference
  from the prefix's own augmented reward (see `guardrail.budget.critic`);
- `dev`: accuracy of the probe and error of the critic, recorded in the manifest.
`test` is never read.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.budget.artifact import SafetyModels
from guardrail.budget.critic import train_critic
from guardrail.budget.latent import LatentCost, answer_states, fit_latent_probe
from guardrail.budget.scoring import (
    COST_SCALE,
    DEFAULT_BUDGET,
    CostModel,
    ProbeCost,
    ProxyReward,
)
from guardrail.calibrate import datasets, labelled
from guardrail.calibrate.judge import is_refusal
from guardrail.decision import DEFAULT_REFUSAL
from guardrail.gate.artifact import Calibration
from guardrail.probes import fit_probe
from guardrail.runtime.embedder import Embedder
from guardrail.runtime.forward import Sampling, decode, prefill
from guardrail.runtime.hooks import Steering
from guardrail.runtime.model import LanguageModel

log = logging.getLogger(__name__)

REFUSALS = (
    DEFAULT_REFUSAL,
    "I can't help with that.",
    "I'm not able to provide instructions for that.",
    "I cannot assist with this request because it could cause harm.",
    "Sorry, I won't help with that, but I'm happy to help with something else.",
)


@dataclass
class SafetyConfig:
    chunk_tokens: int = 16  # the stream's cost checks
    critic_every: int = 4  # tokens between the critic's readings of a rollout
    rollout_tokens: int = 32
    temperature: float = 0.7
    fit_harmful: int = 48  # rollouts per kind (plain, steered) of harmful `fit` prompts
    fit_harmless: int = 64
    select_harmless: int = 128  # greedy, as served by default: sets the operating point
    dev_harmful: int = 24
    dev_harmless: int = 32
    target_search_rate: float = 0.01
    probe_l2: float = 0.3  # chosen on dev rollouts (2026-11-28): 0.01-10 tried
    discount: float = 0.999
    critic_budgets: Sequence[float] = (2.5, 5.0, 7.5)
    critic_epochs: int = 50
    unsafe_value: float = -1.0
    nll_weight: float = 0.1
    batch_size: int = 32
    seed: int = 0
    # The latent cost probe: layers read in one pass (candidates: each alone, and all), the
    # read, L2 settings tried, and the answer tokens its training reads.
    latent_layers: Sequence[int] = (4, 8, 12, 16)
    latent_read: str = "mean"
    latent_l2s: Sequence[float] = (1.0, 10.0, 100.0)
    latent_answer_tokens: int = 96
    cost_model: str = "minilm"  # the default of `scorers()`: "latent" or "minilm"


@dataclass
class Rollout:
    prompt: str
    tokens: list[int]
    kind: str  # "harmful" | "steered" | "harmless"
    marks: list[int] = field(default_factory=list)  # the critic's readings (token counts)
    steps: list[str] = field(default_factory=list)  # the answer at each reading
    hidden: torch.Tensor | None = None  # [readings, hidden]: last hidden state there
    checked: list[bool] = field(default_factory=list)  # reading at a stream check
    rewards: list[float] = field(default_factory=list)  # the proxy reward at each reading

    @property
    def texts(self) -> list[str]:
        """The answer at each chunk boundary (and its end): what a stream is checked on."""
        return [t for t, c in zip(self.steps, self.checked, strict=True) if c]

    @property
    def unsafe(self) -> bool:
        return self.kind != "harmless" and not is_refusal(self.steps[-1] if self.steps else "")


def _column(path: str, column: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as handle:
        return [row[column].strip() for row in csv.DictReader(handle) if row[column].strip()]


def public_unsafe_pairs(split: str) -> list[tuple[str, str]]:
    """AdvBench's harmful strings (after an empty request) and behaviour targets (after their
    behaviour) as (prompt, text), taken by the split of their text (the targets by their
    behaviour's split, so a held-out behaviour's target stays held out)."""
    strings = _column(str(datasets.advbench_strings()), "target")
    with open(datasets.advbench(), encoding="utf-8", newline="") as handle:
        rows = [(r["goal"].strip(), r["target"].strip()) for r in csv.DictReader(handle)]
    return [("", s) for s in strings if datasets.split_of(s) == split] + [
        (goal, target) for goal, target in rows if datasets.split_of(goal) == split
    ]


def public_unsafe_texts(split: str) -> list[str]:
    return [text for _, text in public_unsafe_pairs(split)]


def _operating_shift(peaks: torch.Tensor, rate: float) -> float:
    """The logit that only `rate` of these per-answer peak logits exceed."""
    allowed = int(rate * len(peaks))
    return float(peaks.sort(descending=True).values[min(allowed, len(peaks) - 1)])


def _by_set(items: Sequence[labelled.Labelled]) -> dict[str, list[labelled.Labelled]]:
    out: dict[str, list[labelled.Labelled]] = {}
    for item in items:
        out.setdefault(item.set, []).append(item)
    return out


class _Rollouts:
    """Sample answers and read them every `critic_every` tokens (hidden states under the same
    hooks as the answer was sampled with)."""

    def __init__(
        self, lm: LanguageModel, calibration: Calibration, config: SafetyConfig, progress: bool
    ) -> None:
        self.lm, self.config, self.progress = lm, config, progress
        setting = calibration.steering
        self.steering = (
            (calibration.steering_vectors(setting), setting.strength) if setting else None
        )

    def run(self, prompts: list[str], kind: str, *, greedy: bool = False) -> list[Rollout]:
        config = self.config
        sampling = Sampling(
            max_new_tokens=config.rollout_tokens,
            temperature=0.0 if greedy else config.temperature,
            seed=config.seed,
        )
        out: list[Rollout] = []
        batches = range(0, len(prompts), config.batch_size)
        for start in tqdm(batches, desc=f"rollouts {kind}", disable=not self.progress):
            chunk = prompts[start : start + config.batch_size]
            texts = [self.lm.format_chat(p) for p in chunk]
            with self._hooks(len(chunk), kind):
                tokens = decode(self.lm, prefill(self.lm, texts), sampling)
            rollouts = [Rollout(p, t, kind) for p, t in zip(chunk, tokens, strict=True)]
            self._read(rollouts, texts)
            out.extend(rollouts)
        return out

    def _hooks(self, rows: int, kind: str) -> Any:
        if kind != "steered" or self.steering is None:
            return contextlib.nullcontext()
        hooks = Steering(self.steering[0])
        hooks.coefficients = torch.full((rows,), self.steering[1], device=self.lm.device)
        return hooks.applied(self.lm.model)

    @torch.inference_mode()
    def _read(self, rollouts: list[Rollout], prompts: list[str]) -> None:
        lm = self.lm
        ids = [
            lm.tokenizer(p, add_special_tokens=False)["input_ids"] + r.tokens
            for p, r in zip(prompts, rollouts, strict=True)
        ]
        width = max(len(i) for i in ids)
        pad = int(lm.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with self._hooks(len(rollouts), rollouts[0].kind):
            hidden = lm.model(
                input_ids=input_ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(lm.device),
                output_hidden_states=True,
            ).hidden_states[-1]
        chunk, every = self.config.chunk_tokens, self.config.critic_every
        for row, rollout in enumerate(rollouts):
            n = len(rollout.tokens)
            rollout.marks = sorted({*range(every, n, every), *range(chunk, n, chunk), n} - {0})
            positions = [width - n + t - 1 for t in rollout.marks]
            rollout.hidden = hidden[row, positions].float().cpu()
            rollout.checked = [t % chunk == 0 or t == n for t in rollout.marks]
            rollout.steps = [
                str(lm.tokenizer.decode(rollout.tokens[:t], skip_special_tokens=True))
                for t in rollout.marks
            ]


def calibrate_safety(
    lm: LanguageModel,
    calibration: Calibration,
    config: SafetyConfig | None = None,
    *,
    embedder: Embedder | None = None,
    progress: bool = True,
) -> SafetyModels:
    config = config or SafetyConfig()
    started = time.perf_counter()
    embedder = embedder or Embedder()
    harmful = datasets.load_many([str(p) for p in datasets.default_harmful()])
    harmless = datasets.load_many([str(p) for p in datasets.default_harmless()])

    def pick(prompts: list[str], split: str, n: int) -> list[str]:
        chosen = datasets.take_split(prompts, split)
        order = sorted(chosen, key=lambda p: hashlib.sha256(f"{config.seed}{p}".encode()).digest())
        return order[:n]

    roll = _Rollouts(lm, calibration, config, progress)
    steered = calibration.steering is not None

    def rollouts(split: str, n_harmful: int, n_harmless: int) -> list[Rollout]:
        out = roll.run(pick(harmful, split, n_harmful), "harmful")
        if steered:
            out += roll.run(pick(harmful, split, n_harmful), "steered")
        return out + roll.run(pick(harmless, split, n_harmless), "harmless")

    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = round(time.perf_counter() - started - sum(stages.values()), 1)

    fit = [r for r in rollouts("fit", config.fit_harmful, config.fit_harmless) if r.steps]
    dev = [r for r in rollouts("dev", config.dev_harmful, config.dev_harmless) if r.steps]
    select_prompts = pick(harmless, "select", config.select_harmless)
    select = [r for r in roll.run(select_prompts, "harmless", greedy=True) if r.steps]

    lap("rollouts")
    answers_fit, answers_select = labelled.shipped("fit"), labelled.shipped("select")
    # MiniLM probe: every boundary text of a rollout carries the rollout's label; public unsafe
    # text and the human-labelled answers (their responses alone: it never reads the prompt).
    unsafe_texts = [t for r in fit if r.unsafe for t in r.texts] + public_unsafe_texts("fit")
    safe_texts = [t for r in fit if not r.unsafe for t in r.texts] + list(REFUSALS)
    unsafe_texts += [a.response for a in answers_fit if a.unsafe]
    safe_texts += [a.response for a in answers_fit if not a.unsafe]
    weight, bias = fit_probe(
        embedder.embed(unsafe_texts), embedder.embed(safe_texts), l2=config.probe_l2
    )
    probe = ProbeCost(embedder, weight, bias)
    peaks = torch.stack([probe.logits(r.texts).max() for r in select])
    shift = _operating_shift(peaks, config.target_search_rate)
    probe = ProbeCost(embedder, weight, bias - shift)  # logit 0 (cost 5) = the operating point
    lap("cost_probe")

    # Latent probe: the same rollouts and public text as (prompt, answer) pairs, and the
    # labelled answers with their prompts; layers, read and L2 chosen on `select` answers.
    pairs = [(r.prompt, t, r.unsafe) for r in fit for t in r.texts]
    pairs += [(p, t, True) for p, t in public_unsafe_pairs("fit")]
    pairs += [("", t, False) for t in REFUSALS]
    pairs += [(a.prompt, a.response, a.unsafe) for a in answers_fit]
    read, layers = config.latent_read, list(config.latent_layers)

    def states(prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        return answer_states(
            lm,
            prompts,
            texts,
            layers,
            reads=(read,),
            max_answer_tokens=config.latent_answer_tokens,
            batch_size=config.batch_size,
        )[read][:, 0]

    x = states([p for p, _, _ in pairs], [t for _, t, _ in pairs])
    selects = {
        name: (
            states([a.prompt for a in items], [a.response for a in items]),
            torch.tensor([a.unsafe for a in items]),
        )
        for name, items in _by_set(answers_select).items()
        if 0 < sum(a.unsafe for a in items) < len(items)
    }
    candidates = [[layer] for layer in layers] + ([layers] if len(layers) > 1 else [])
    chosen = fit_latent_probe(
        (x, torch.tensor([u for _, _, u in pairs])), selects, layers, candidates, config.latent_l2s
    )
    latent = LatentCost(lm, chosen.layers, chosen.weight, chosen.bias, read=read)
    latent_peaks = torch.stack(
        [latent.logits([r.prompt] * len(r.texts), r.texts).max() for r in select]
    )
    latent_shift = _operating_shift(latent_peaks, config.target_search_rate)
    latent = LatentCost(lm, chosen.layers, chosen.weight, chosen.bias - latent_shift, read=read)
    default: CostModel = latent if config.cost_model == "latent" else probe
    lap("latent_cost")
    lap("cost_probe")
    reward = ProxyReward(embedder, lm, config.nll_weight)
    for group in (fit, dev):
        values = reward.reward_prefixes([r.prompt for r in group], [r.steps for r in group])
        for rollout, scores in zip(group, values, strict=True):
            rollout.rewards = scores

    def reading_costs(group: list[Rollout]) -> list[list[float]]:
        """The default cost model's cost at each reading of each rollout."""
        if not isinstance(default, LatentCost):
            return [default.cost([r.prompt] * len(r.steps), r.steps) for r in group]
        at: list[int | None] = [*sorted({t for r in group for t in r.marks[:-1]}), None]
        along = default.costs_along([r.prompt for r in group], [r.steps[-1] for r in group], at)
        return [
            [float(along[i, at.index(t) if t != len(r.tokens) else -1]) for t in r.marks]
            for i, r in enumerate(group)
        ]

    def critic_data(
        group: list[Rollout],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs (h, z), the prefix's augmented reward, and the value to estimate."""
        hs, zs, prefix, values = [], [], [], []
        for rollout, costs in zip(group, reading_costs(group), strict=True):
            # The path cost at each reading: the highest stream check so far, or the reading.
            checks = [c if at else -math.inf for c, at in zip(costs, rollout.checked, strict=True)]
            path = [max(m, c) for m, c in zip(accumulate(checks, max), costs, strict=True)]
            for d in config.critic_budgets:
                value = rollout.rewards[-1] if path[-1] <= d else config.unsafe_value
                for j, t in enumerate(rollout.marks):
                    assert rollout.hidden is not None
                    hs.append(rollout.hidden[j])
                    zs.append(d - path[j])
                    r = rollout.rewards[j]
                    prefix.append(r if path[j] <= d else config.unsafe_value)
                    values.append(config.discount ** (len(rollout.tokens) - t) * value)
        return torch.stack(hs), torch.tensor(zs), torch.tensor(prefix), torch.tensor(values)

    lap("rewards")
    h, z, a, y = critic_data(fit)
    critic = train_critic(h, z, y - a, epochs=config.critic_epochs, seed=config.seed)
    lap("critic")
    dev_h, dev_z, dev_a, dev_y = critic_data(dev)
    predicted = dev_a + critic(dev_h, dev_z).detach()

    def rmse(estimate: torch.Tensor) -> float:
        return round(float((estimate - dev_y).square().mean().sqrt()), 4)

    report = {
        "cost_model": config.cost_model,
        "cost_probe": _probe_report(probe, dev, DEFAULT_BUDGET),
        "latent_cost": {
            **_probe_report(latent, dev, DEFAULT_BUDGET),
            "layers": chosen.layers,
            "read": read,
            "l2": chosen.l2,
            "select_auroc": chosen.select_auroc,
        },
        "select_harmless_search_rate": round(
            float((COST_SCALE * torch.sigmoid(peaks - shift) > DEFAULT_BUDGET).float().mean()), 4
        ),
        "latent_select_harmless_search_rate": round(
            float((latent_peaks > latent_shift).float().mean()), 4
        ),
        "critic_dev": {  # the value's error: the critic's, the prefix's own score's, the mean's
            "rmse": rmse(predicted),
            "rmse_of_prefix": rmse(dev_a),
            "rmse_of_mean": rmse(y.mean().expand_as(dev_y)),
            "sign_accuracy": round(float(((predicted > 0) == (dev_y > 0)).float().mean()), 4),
            "samples": len(dev_y),
        },
        "critic_fit_samples": len(y),
    }
    manifest = {
        "model_fingerprint": lm.fingerprint,
        "embedder": embedder.fingerprint,
        "config": asdict(config),
        "steering": calibration.steering.as_dict() if calibration.steering else None,
        "rollouts": {
            "fit": _counts(fit),
            "dev": _counts(dev),
            "select": len(select),
        },
        "report": report,
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": stages,
    }
    (tqdm.write if progress else log.info)(f"cost model and critic: {json.dumps(report)}")
    return SafetyModels(
        weight,
        bias - shift,
        critic,
        manifest,
        latent_weight=chosen.weight,
        latent_bias=chosen.bias - latent_shift,
        latent_layers=chosen.layers,
        latent_read=read,
        cost_model=config.cost_model,
    )


def _counts(group: list[Rollout]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in group:
        key = f"{r.kind}/{'unsafe' if r.unsafe else 'safe'}"
        out[key] = out.get(key, 0) + 1
    return out


def _probe_report(probe: CostModel, dev: list[Rollout], budget: float) -> dict[str, Any]:
    """Held-aside (`dev`) accuracy: a rollout is flagged when any boundary crosses `budget`."""
    flagged = [max(probe.cost([r.prompt] * len(r.texts), r.texts)) > budget for r in dev]
    labels = [r.unsafe for r in dev]
    unsafe = [f for f, u in zip(flagged, labels, strict=True) if u]
    safe = [f for f, u in zip(flagged, labels, strict=True) if not u]
    pairs = public_unsafe_pairs("dev")
    public = probe.cost([p for p, _ in pairs], [t for _, t in pairs])
    return {
        "accuracy": round(sum(f == u for f, u in zip(flagged, labels, strict=True)) / len(dev), 4),
        "tpr": round(sum(unsafe) / max(len(unsafe), 1), 4),
        "fpr": round(sum(safe) / max(len(safe), 1), 4),
        "unsafe": len(unsafe),
        "safe": len(safe),
        "public_unsafe_dev_tpr": round(sum(c > budget for c in public) / max(len(public), 1), 4),
    }


__all__ = [
    "SafetyConfig",
    "calibrate_safety",
    "public_unsafe_pairs",
    "public_unsafe_texts",
]
