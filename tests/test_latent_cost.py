"""The latent cost model: the worker's decode-time read equals a full pass over the same text.

Mechanics on a tiny random model (the probe's weights are random too); how well the
calibrated probe separates human-labelled answers is in test_guard.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import _tiny
from guardrail.budget.latent import LatentCost, answer_states, state_reader
from guardrail.budget.scoring import CachedCost
from guardrail.budget.search import Scorers
from guardrail.runtime.forward import Sampling
from guardrail.serve.worker import LocalWorker, Request, answer_all


@pytest.fixture(scope="module")
def llama() -> Any:
    return _tiny("llama")


class CountingLatent(LatentCost):
    """Records what was scored from states and what needed a pass over text."""

    def __init__(self, lm: Any, read: str = "last") -> None:
        weight = torch.randn(2 * lm.hidden_size, generator=torch.Generator().manual_seed(3))
        super().__init__(lm, [0, 2], weight, 0.0, read=read)
        self.from_states: list[float] = []
        self.from_text: list[str] = []

    def cost_of_states(self, states: torch.Tensor) -> list[float]:
        values = super().cost_of_states(states)
        self.from_states.extend(values)
        return values

    def cost(self, prompts: Any, responses: Any) -> list[float]:
        self.from_text.extend(responses)
        return super().cost(prompts, responses)


def _answer(worker: LocalWorker, request: Request) -> tuple[list[str], Any]:
    [item] = answer_all(worker, [request], timeout=60)
    return item.chunks, item.outcome


def test_answer_states_read_each_row_alone(llama: Any) -> None:
    """Batched by length with right padding: a pair's states do not depend on its batch."""
    prompts, responses = ["Hi", "What is the capital of France?"], ["Hello there", "Paris."]
    both = answer_states(llama, prompts, responses, [0, 2], at=(1, None))["last"]
    for i in range(2):
        alone = answer_states(
            llama, prompts[i : i + 1], responses[i : i + 1], [0, 2], at=(1, None)
        )["last"]
        torch.testing.assert_close(both[i], alone[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[0, 0], both[0, 1])  # first token and whole answer differ


@pytest.mark.parametrize("read", ["last", "mean"])
def test_worker_scores_checks_from_decode_states_as_a_full_pass_would(
    llama: Any, read: str
) -> None:
    cost = CountingLatent(llama, read)
    assert state_reader(CachedCost(cost)) is cost
    worker = LocalWorker(llama, None, chunk_tokens=3, scorers=Scorers(CachedCost(cost)))
    prompt = "What is the capital of France?"
    request = Request(prompt, Sampling(max_new_tokens=10), guarded=False, budget=100.0)
    chunks, answer = _answer(worker, request)
    worker.close()
    assert answer.text == "".join(chunks).strip()
    # Checks at 3, 6 and 10 tokens (the limit: the row waits one step for the model to read
    # its last token) all read the decode states; only a stripped final answer is run again.
    assert len(cost.from_states) == 3, cost.from_states
    released = [chunks[0], chunks[0] + chunks[1], "".join(chunks)]
    again = LatentCost(llama, cost.layers, cost.weight, cost.bias, read=read)
    assert again.cost([prompt] * 3, released) == pytest.approx(cost.from_states, abs=1e-3)
    assert set(cost.from_text) <= {released[-1].strip()}
    assert answer.decision.new_tokens == 10


@pytest.mark.parametrize("read", ["last", "mean"])
def test_a_stripped_final_answer_reads_an_earlier_step(llama: Any, read: str) -> None:
    """This tiny model's answer to this prompt ends in spaces at 22 tokens. The answer is
    returned stripped, so that text is checked too: it is the answer's first tokens, whose
    states a recent decode step recorded. No pass over it, and the cost a pass gives."""
    cost = CountingLatent(llama, read)
    worker = LocalWorker(llama, None, chunk_tokens=3, scorers=Scorers(cost))
    prompt = "Name three colours."
    request = Request(prompt, Sampling(max_new_tokens=22), guarded=False, budget=100.0)
    chunks, answer = _answer(worker, request)
    worker.close()
    whole = "".join(chunks)
    assert whole != whole.rstrip() and answer.text == whole.strip()
    assert cost.from_text == []
    again = LatentCost(llama, cost.layers, cost.weight, cost.bias, read=read)
    assert again.cost([prompt], [answer.text]) == pytest.approx(cost.from_states[-1:], abs=1e-3)


def test_held_back_text_is_scored_by_text(llama: Any) -> None:
    cost = CountingLatent(llama)
    worker = LocalWorker(llama, None, chunk_tokens=3, scorers=Scorers(cost))
    request = Request("Hi", Sampling(max_new_tokens=8), guarded=False, budget=100.0, stop=("zzzz",))
    _answer(worker, request)
    worker.close()
    # Mid-answer, a possible stop string's start is held back: not all the tokens, so not
    # their states. The final answer (no stop string in it) is all of them again.
    assert len(cost.from_text) >= 2 and len(cost.from_states) <= 1


def test_over_budget_state_check_releases_nothing(llama: Any) -> None:
    cost = CountingLatent(llama)
    worker = LocalWorker(llama, None, chunk_tokens=3, scorers=Scorers(cost))
    request = Request(
        "Hi", Sampling(max_new_tokens=10), guarded=False, budget=-1.0, refusal_text="NO"
    )
    chunks, answer = _answer(worker, request)
    worker.close()
    assert cost.from_states, "the first check reads the states"
    assert answer.decision.reason in ("over_budget", "refusal_over_budget")
    assert chunks in ([], [""]) and answer.text == ""  # the refusal is over budget too


def test_a_request_picks_one_of_the_workers_cost_models(llama: Any) -> None:
    """A tenant's `cost_model` names one of the worker's alternatives: its rows are scored by
    that model (by text), the rest by the default (from states); unknown names fail early."""
    from guardrail.errors import InputError
    from guardrail.serve.guard import Guard
    from guardrail.tenants.schema import PolicyError
    from guardrail.tenants.store import TenantPolicy

    default, other = CountingLatent(llama), CountingLatent(llama)
    scorers = Scorers(default, alternatives={"latent": default, "other": other})
    worker = LocalWorker(llama, None, chunk_tokens=3, scorers=scorers)
    sampling = Sampling(max_new_tokens=8)
    _answer(worker, Request("Hi", sampling, guarded=False, budget=100.0, cost_model="other"))
    assert other.from_text and not other.from_states and not default.from_text
    _answer(worker, Request("Hi", sampling, guarded=False, budget=100.0, cost_model="latent"))
    assert default.from_states
    with pytest.raises(InputError, match="unknown cost model 'nope'; this worker has: latent"):
        worker.submit(Request("Hi", sampling, budget=1.0, cost_model="nope"), None)  # type: ignore[arg-type]
    guard = Guard(worker=worker, policies={"t": TenantPolicy(cost_model="nope")})
    with pytest.raises(PolicyError, match="cost_model: unknown cost model 'nope'"):
        guard.request("Hi", "t")
    guard.close()
