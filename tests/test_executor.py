"""The executor: every forward pass on the model's device and dtype.

No GPU here, so the dtype half is what shows: the worker runs a model in bfloat16 (gate
read-out, steering, the latent cost model's state reads, the search with its critic and the
proxy reward) and answers come back without dtype errors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_worker import PROMPTS, _collect, hand_calibration

from conftest import _tiny
from guardrail.budget.critic import train_critic
from guardrail.budget.latent import LatentCost
from guardrail.budget.scoring import ProxyReward
from guardrail.budget.search import Scorers, SearchSettings
from guardrail.runtime.embedder import Embedder
from guardrail.runtime.executor import Executor
from guardrail.runtime.forward import Sampling
from guardrail.serve.worker import LocalWorker, Request


class OverAtFirstCheck:
    """Cost 9 for the plain answer's first chunks (answers that start with `text`), else 1."""

    name, fingerprint, reads_prompt = "over-first", "v1", False

    def __init__(self, text: str) -> None:
        self.text = text

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [9.0 if r and r.startswith(self.text) else 1.0 for r in responses]


def _bfloat16(lm: Any) -> Any:
    lm.model.to(torch.bfloat16)
    return lm


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def _run_everything(lm: Any, embedder: Embedder, *, new_tokens: int) -> list[Any]:
    """Plain, steered, refused, latent-checked and searched rows in one worker."""
    calibration = hand_calibration(lm)
    solo = LocalWorker(lm, calibration, start=False)
    sea = PROMPTS[2]
    plain = _collect(solo, [Request(sea, Sampling(max_new_tokens=new_tokens), guarded=False)])
    solo.close()
    first = lm.tokenizer(plain[0].text, add_special_tokens=False)["input_ids"][:2]
    over = OverAtFirstCheck(str(lm.tokenizer.decode(first)))
    hidden = lm.hidden_size
    h = torch.randn(32, hidden)
    critic = train_critic(h, torch.ones(32), h[:, 0], epochs=2)
    latent = LatentCost(lm, [1], torch.randn(hidden) * 0.01, -3.0, read="mean")
    scorers = Scorers(
        latent,
        reward=ProxyReward(embedder, lm),
        critic=critic,
        alternatives={"latent": latent, "over": over},
    )
    worker = LocalWorker(lm, calibration, chunk_tokens=4, scorers=scorers, start=False)
    search = SearchSettings(width=4, samples=2, beams=2, rounds=2, score="critic")
    sampling = Sampling(max_new_tokens=new_tokens)
    requests = [Request(p, sampling) for p in PROMPTS]  # two fire: steered
    requests.append(Request(PROMPTS[2], sampling, on_fire="refuse"))
    requests.append(Request(PROMPTS[0], sampling, guarded=False, budget=5.0))  # latent reads
    requests.append(
        Request(sea, sampling, guarded=False, budget=5.0, search=search, cost_model="over")
    )
    answers = _collect(worker, requests)
    worker.close()
    assert worker.stats.searches == 1
    return answers


def test_the_worker_runs_a_bfloat16_model(embedder: Embedder) -> None:
    lm = _bfloat16(_tiny("llama"))
    assert Executor(lm).dtype == torch.bfloat16
    answers = _run_everything(lm, embedder, new_tokens=10)
    assert all(hasattr(a, "text") for a in answers), answers  # no exception came back
    paths = [a.decision.path for a in answers]
    assert paths.count("steered") == 2 and paths[-1] == "search" and "refused" in paths
    assert answers[-1].decision.candidates >= 4 and answers[-1].decision.reason is None
    assert answers[-2].decision.cost is not None  # scored (from the decode states)


def test_the_embedded_model_runs_in_bfloat16(lm: Any, embedder: Embedder) -> None:
    """The real model, cast to bfloat16 (a copy: the session's model stays float32)."""
    import copy

    real = copy.copy(lm)
    real.model = copy.deepcopy(lm.model).to(torch.bfloat16)
    answers = _run_everything(real, embedder, new_tokens=6)
    assert all(hasattr(a, "text") for a in answers), answers
    assert [a.decision.path for a in answers][-1] == "search"
    assert all(a.text for a in answers[: len(PROMPTS)])


def test_tensors_follow_the_model() -> None:
    lm = _bfloat16(_tiny("llama"))
    executor = Executor(lm)
    assert executor.put(torch.ones(3)).dtype == torch.bfloat16
    assert executor.put(torch.ones(3, dtype=torch.long)).dtype == torch.long
    steering = executor.steering([{1: torch.ones(lm.hidden_size)}, {}], [2.0, 0.0])
    assert steering is not None and steering.vectors[1].dtype == torch.bfloat16
    assert executor.steering([{1: torch.ones(lm.hidden_size)}], [0.0]) is None
