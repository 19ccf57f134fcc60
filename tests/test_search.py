"""InferenceGuard search mechanics on a tiny random model (KV reuse, budget, resampling,
baselines, steering). The real cost model, critic and figures: test_safety.py and
bench/bench_search.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from conftest import _tiny
from guardrail.budget.critic import Critic, train_critic
from guardrail.budget.search import Scorers, SearchSettings, path_cost, run, search
from guardrail.runtime.forward import Sampling, decode, prefill

PROMPT = "Tell me about the sea."


class TextCost:
    """Cost 9 for answers containing `marker` (a decoded token), else 1."""

    name, fingerprint, reads_prompt = "text-cost", "v1", False

    def __init__(self, marker: str | None = None, always: float | None = None) -> None:
        self.marker, self.always = marker, always

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.always is not None:
            return [self.always] * len(responses)
        return [9.0 if self.marker and self.marker in r else 1.0 for r in responses]


class LengthReward:
    def reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [len(r) / 100 for r in responses]


@pytest.fixture(scope="module")
def lm() -> Any:
    return _tiny("llama")


def _search(lm: Any, scorers: Scorers, settings: SearchSettings, **options: Any) -> Any:
    """Run a search for PROMPT to its end, budget 5."""
    return run(search(lm, lm.format_chat(PROMPT), PROMPT, scorers, settings, budget=5.0, **options))


def _text(lm: Any, tokens: list[int] | None) -> str:
    return str(lm.tokenizer.decode(tokens or [], skip_special_tokens=True))


def test_near_greedy_search_continues_exactly_like_decode(lm: Any) -> None:
    """One beam, one sample, near-zero temperature: chunk after chunk from the kept KV
    caches, the search writes what plain greedy decoding writes."""
    text = lm.format_chat(PROMPT)
    greedy = decode(lm, prefill(lm, [text]), Sampling(max_new_tokens=10))[0]
    settings = SearchSettings(
        width=3, samples=1, beams=1, rounds=10, temperature=1e-6, score="augmented"
    )
    scorers = Scorers(TextCost(), reward=LengthReward())
    result = _search(lm, scorers, settings, max_new_tokens=8, prefix=greedy[:2])
    assert result.tokens == greedy[:10]
    assert result.rounds == 3 and result.candidates == 3 and result.cost == 1.0
    assert result.sampled == 8  # 3 + 3 + 2 tokens: the search's compute


def test_search_returns_only_answers_within_budget(lm: Any) -> None:
    scorers = Scorers(TextCost(always=9.0), reward=LengthReward())
    settings = SearchSettings(width=4, samples=3, beams=2, rounds=3, score="augmented")
    generator = torch.Generator().manual_seed(0)
    nothing = _search(lm, scorers, settings, max_new_tokens=8, generator=generator)
    assert nothing.tokens is None and nothing.cost is None
    assert nothing.resampled == 3 and nothing.candidates == 18  # 2 x 3 a round, all resampled

    # Baselines rank every candidate: they may return an answer over budget.
    for score in ("augmented", "lagrangian"):
        loose = SearchSettings(width=4, samples=3, beams=2, rounds=2, score=score, strict=False)
        found = _search(lm, scorers, loose, max_new_tokens=8, generator=generator)
        assert found.tokens is not None and found.cost == 9.0


def test_resampling_penalises_the_tokens_that_went_over(lm: Any) -> None:
    """Candidates containing the near-greedy first token are over budget; the penalty makes
    the resampled round avoid it, so the answer is within budget."""
    text = lm.format_chat(PROMPT)
    first = decode(lm, prefill(lm, [text]), Sampling(max_new_tokens=1))[0]
    scorers = Scorers(TextCost(marker=_text(lm, first)), reward=LengthReward())
    settings = SearchSettings(
        width=2, samples=2, beams=1, rounds=4, temperature=1e-6, penalty=1e4, score="augmented"
    )
    result = _search(lm, scorers, settings, max_new_tokens=4)
    assert result.resampled >= 1 and result.tokens is not None
    assert result.cost == 1.0 and result.tokens[0] != first[0]


def test_critic_ranks_candidates(lm: Any) -> None:
    """An unfinished answer is worth its prefix's reward plus the critic's correction, a
    finished one its reward (and the search refuses to run without a critic or a reward)."""
    torch.manual_seed(0)
    h = torch.randn(64, lm.hidden_size)
    critic = train_critic(h, torch.ones(64), h[:, 0], epochs=30)
    with torch.no_grad():  # a critic whose correction is the same 0.25 everywhere
        critic.net[-1].weight.zero_()
        critic.net[-1].bias.fill_(0.25)
    scorers = Scorers(TextCost(), reward=LengthReward(), critic=critic)
    settings = SearchSettings(width=3, samples=4, beams=1, rounds=1, score="critic")
    seeded = {"generator": torch.Generator().manual_seed(3)}
    cut = _search(lm, scorers, settings, max_new_tokens=6, **seeded)  # out of rounds, unfinished
    assert isinstance(critic, Critic) and cut.tokens is not None and cut.candidates == 4
    reward = LengthReward().reward([PROMPT], [_text(lm, cut.tokens)])[0]
    assert cut.score == pytest.approx(reward + 0.25)

    seeded = {"generator": torch.Generator().manual_seed(3)}
    done = _search(lm, scorers, settings, max_new_tokens=3, **seeded)  # finished: its reward
    assert done.tokens is not None
    assert done.score == LengthReward().reward([PROMPT], [_text(lm, done.tokens)])[0]

    with pytest.raises(ValueError, match="critic"):
        _search(lm, Scorers(TextCost(), reward=LengthReward()), settings, max_new_tokens=3)
    with pytest.raises(ValueError, match="reward"):
        _search(lm, Scorers(TextCost(), critic=critic), settings, max_new_tokens=3)


def test_steering_applies_during_search_only(lm: Any) -> None:
    text = lm.format_chat(PROMPT)
    before = decode(lm, prefill(lm, [text]), Sampling(max_new_tokens=6))[0]
    vectors = {1: torch.ones(lm.hidden_size)}
    settings = SearchSettings(
        width=3, samples=1, beams=1, rounds=2, temperature=1e-6, score="augmented"
    )
    scorers = Scorers(TextCost(), reward=LengthReward())
    steered = _search(lm, scorers, settings, max_new_tokens=6, steering=(vectors, 50.0))
    assert steered.tokens is not None and steered.tokens != before
    after = decode(lm, prefill(lm, [text]), Sampling(max_new_tokens=6))[0]
    assert after == before  # the hooks left with the search


class PrefixCost:
    """Cost 9 for exactly one text (a prefix of some answer), else 1."""

    name, fingerprint, reads_prompt = "prefix-cost", "v1", False

    def __init__(self, text: str) -> None:
        self.text = text

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [9.0 if r == self.text else 1.0 for r in responses]


def test_a_prefix_over_budget_makes_the_answer_over_budget(lm: Any) -> None:
    """Costs are checked as a stream releases the answer: an answer whose first chunk went
    over budget stays over budget, however its end scores."""
    greedy = decode(lm, prefill(lm, [lm.format_chat(PROMPT)]), Sampling(max_new_tokens=4))[0]
    cost = PrefixCost(_text(lm, greedy[:2]))
    assert path_cost(lm, cost, PROMPT, greedy, every=2) == 9.0
    assert path_cost(lm, cost, PROMPT, greedy, every=3) == 1.0  # checked at 3 and 4 only

    scorers = Scorers(cost, reward=LengthReward())
    for check, expected in ((4, greedy), (2, None)):
        settings = SearchSettings(
            width=4, samples=1, beams=1, rounds=1, temperature=1e-6, score="augmented", check=check
        )
        assert _search(lm, scorers, settings, max_new_tokens=4).tokens == expected


def test_checks_fall_on_the_streams_chunks_whatever_the_width(lm: Any) -> None:
    """With chunks of 4 tokens and search rounds of 3, the check at the answer's 4th token lies
    inside the second round: the candidate that went over there is never returned."""
    greedy = decode(lm, prefill(lm, [lm.format_chat(PROMPT)]), Sampling(max_new_tokens=6))[0]
    cost = PrefixCost(_text(lm, greedy[:4]))
    assert path_cost(lm, cost, PROMPT, greedy, every=4) == 9.0
    settings = SearchSettings(
        width=3, samples=1, beams=1, rounds=2, temperature=1e-6, score="augmented", check=4
    )
    result = _search(lm, Scorers(cost, reward=LengthReward()), settings, max_new_tokens=6)
    assert result.tokens == greedy[:3] and result.resampled == 1  # cut where it was in budget


def test_search_rounds_feed_only_new_tokens_and_the_reward_reads_their_logprobs(lm: Any) -> None:
    """From a row's own state, every forward pass of the search (the proxy reward's included)
    feeds one token per candidate: nothing runs the prompt again. The reward's fluency term,
    read from the logits the tokens were sampled from, is the NLL a full pass computes."""
    from guardrail.budget.scoring import ProxyReward
    from guardrail.budget.search import SearchStart
    from guardrail.runtime.embedder import Embedder
    from guardrail.runtime.executor import Executor
    from guardrail.runtime.forward import token_nlls

    reward = ProxyReward(Embedder(), lm)
    executor = Executor(lm)
    answer = "The sea is wide, and the waves are blue."
    ids = lm.tokenizer(lm.format_chat(PROMPT), add_special_tokens=False)["input_ids"]
    tokens = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    read = executor.prefill([ids + tokens], logprobs=len(tokens)).logprobs
    assert read is not None
    full = token_nlls(lm, [PROMPT], [answer])[0]
    assert torch.allclose(-read[0], full, atol=1e-4)
    nll = float(full.mean())
    expected = reward.reward([PROMPT], [answer])[0]
    assert reward.reward_with_nlls([PROMPT], [answer], [nll])[0] == pytest.approx(expected)

    prefilled = executor.prefill([ids + tokens[:3]], hidden=True, logprobs=3)
    assert prefilled.hidden is not None and prefilled.logprobs is not None
    start = SearchStart(prefilled.state, prefilled.hidden, prefilled.logprobs[0].tolist())
    widths: list[int] = []

    def count(_module: Any, args: Any, kwargs: Any) -> None:
        widths.append(int((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]))

    handle = lm.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        settings = SearchSettings(width=3, samples=2, beams=2, rounds=3, score="augmented")
        result = run(
            search(
                lm,
                lm.format_chat(PROMPT),
                PROMPT,
                Scorers(TextCost(), reward=reward),
                settings,
                budget=5.0,
                max_new_tokens=9,
                prefix=tokens[:3],
                start=start,
                executor=executor,
                generator=torch.Generator().manual_seed(0),
            )
        )
    finally:
        handle.remove()
    assert result.tokens is not None and result.tokens[:3] == tokens[:3]
    assert widths and set(widths) == {1}  # one new token per pass
    assert len(widths) <= settings.rounds * settings.width


class OnceOver:
    """Cost 9 the first time it sees `text`, 0 for anything else or after."""

    name, fingerprint, reads_prompt = "once-over", "v1", False

    def __init__(self, text: str) -> None:
        self.text, self.seen = text, False

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for r in responses:
            over = r == self.text and not self.seen
            self.seen = self.seen or over
            out.append(9.0 if over else 0.0)
        return out


def test_the_worker_search_continues_the_rows_own_cache_exactly(lm: Any) -> None:
    """A near-greedy search of one beam, handed a row whose second chunk went over budget
    once, writes exactly the plain answer: it continued from the row's own KV cache and
    token ids, cut back to the released prefix (no re-tokenised prompt + text)."""
    from test_worker import _collect

    from guardrail.serve.worker import LocalWorker, Request

    prompt = "Write a long poem about the sea, the wind, the stars and the sailors."
    plain_worker = LocalWorker(lm, None, start=False)
    plain = _collect(plain_worker, [Request(prompt, Sampling(max_new_tokens=12), guarded=False)])
    plain_worker.close()
    tokens = decode(lm, prefill(lm, [lm.format_chat(prompt)]), Sampling(max_new_tokens=12))[0]
    assert _text(lm, tokens).strip() == plain[0].text and len(tokens) == 12
    cost = OnceOver(_text(lm, tokens[:8]))
    scorers = Scorers(cost, reward=LengthReward())
    worker = LocalWorker(lm, None, chunk_tokens=4, scorers=scorers, start=False)
    settings = SearchSettings(
        width=4, samples=1, beams=1, rounds=3, temperature=1e-6, score="augmented"
    )
    request = Request(prompt, Sampling(max_new_tokens=12), guarded=False, budget=5.0)
    searched = _collect(worker, [replace(request, search=settings)])[0]
    worker.close()
    assert cost.seen and searched.decision.path == "search" and worker.stats.searches == 1
    assert searched.text == plain[0].text
