"""InferenceGuard's safety-budgeted search, and the baselines it is measured against.

Each round grows the kept beams by `width` tokens, sampling `beams * samples` continuations
(spread evenly over the beams) in one batch that starts from the beams' own KV caches (the
prompt is never run again). Each candidate gets a safety state z = budget - its path cost
(the highest cost of its text at any check so far, every `check` tokens: what a stream would
have released) and a score:

- `critic`: InferenceGuard's ranking of unfinished answers, the latent critic's value
  V(h, z) = the prefix's augmented reward + the critic's correction C(h, z) (h: the last
  hidden state; see `guardrail.budget.critic`); a finished answer is worth its reward;
- `augmented`: the reward while z >= 0, `unsafe_value` once over budget;
- `lagrangian`: reward - lagrange * cost (the classic constrained-decoding baseline).

InferenceGuard (`strict=True`, `resample=True`) keeps the top K candidates within budget;
when every candidate is over budget it lowers the logits of the tokens those candidates used
by `penalty` and samples the round again. It returns the best finished answer within budget,
or nothing (the caller answers with the refusal text). Baselines run the same loop with
`strict=False` (they may return an answer over budget): best-of-N is one round of
`max_new_tokens` tokens, beam search is this loop without resampling.

`search` is a generator that yields after every forward pass, so the worker can interleave a
slow search with the decode steps of everyone else; `run` drives it to the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from guardrail.budget.critic import Critic
from guardrail.budget.scoring import CostModel, RewardModel, TokenReward
from guardrail.errors import InputError
from guardrail.runtime.executor import Executor
from guardrail.runtime.forward import Prefilled
from guardrail.runtime.hooks import Steering
from guardrail.runtime.model import LanguageModel

Score = Literal["critic", "augmented", "lagrangian"]


@dataclass(frozen=True)
class SearchSettings:
    width: int = 24  # tokens per round
    samples: int = 6  # continuations sampled per beam (K x S a round)
    beams: int = 4  # beams kept (K)
    rounds: int = 8  # rounds, including resampled ones
    penalty: float = 5.0  # logit penalty on tokens of over-budget candidates
    temperature: float = 0.8
    top_p: float = 0.95
    score: Score = "critic"
    strict: bool = True  # only candidates within budget are kept or returned
    resample: bool = True  # penalise and resample when every candidate is over budget
    unsafe_value: float = -1.0  # the augmented value of an over-budget candidate
    lagrange: float = 1.0
    check: int = 16  # tokens between cost checks, as a stream's chunks (see `path_cost`)


def path_cost(
    lm: LanguageModel, cost: CostModel, query: str, tokens: Sequence[int], every: int
) -> float:
    """The cost of an answer as a stream releases it: the highest cost of its prefixes at every
    `every` tokens and at its end. With a response-level cost model this is what the paper's
    cumulative cost is to a token-level one: it never goes down as the answer grows."""
    text = str(lm.tokenizer.decode(tokens, skip_special_tokens=True))
    return _path_costs(lm, cost, query, [_Beam([], -1)], [list(tokens)], [text], every)[0]


@dataclass
class Scorers:
    """What the search reads: the cost model, the reward model, and the critic (optional)."""

    cost: CostModel
    reward: RewardModel | None = None
    critic: Critic | None = None
    # Other cost models a request may name (a tenant's `cost_model`); the critic learned
    # `cost`'s scale, so a search under one of these ranks by reward and cost instead.
    alternatives: dict[str, CostModel] = field(default_factory=dict)

    def for_cost(self, name: str | None) -> Scorers:
        """These scorers with the named cost model (None: `cost`)."""
        if name is None or self.alternatives.get(name) is self.cost:
            return self
        if name not in self.alternatives:
            known = ", ".join(sorted(self.alternatives)) or "none"
            raise InputError(f"unknown cost model {name!r}; this worker has: {known}")
        return Scorers(self.alternatives[name], self.reward, None, self.alternatives)


@dataclass
class SearchResult:
    tokens: list[int] | None  # the answer (prefix included); None: nothing within budget
    cost: float | None
    score: float | None
    candidates: int = 0  # candidates scored
    sampled: int = 0  # tokens sampled (the search's compute, next to a plain answer's length)
    rounds: int = 0
    resampled: int = 0  # rounds that had to resample
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchStart:
    """Where a search continues a row from: the row's own KV cache with the logits after its
    prefix, the last hidden state there, and the prefix tokens' log-probabilities (the
    reward's fluency term; None: unknown, the reward reads the text instead)."""

    state: Prefilled
    hidden: torch.Tensor  # [1, hidden]
    logprobs: list[float] | None = None


@dataclass
class _Beam:
    tokens: list[int]
    row: int  # row in the beams' state
    score: float = 0.0
    cost: float = -math.inf  # path cost; the search's starting prefix was checked by its caller
    logprobs: list[float] | None = None  # each token's, under the logits it was sampled from


class _Steered:
    """The search's steering (when the gate fired): on for every pass of the search."""

    def __init__(
        self, executor: Executor, steering: tuple[dict[int, torch.Tensor], float] | None
    ) -> None:
        self.executor, self.steering = executor, steering
        self._built: tuple[int, Steering | None] = (-1, None)

    def hooks(self, rows: int) -> Steering | None:
        if self.steering is None:
            return None
        if self._built[0] != rows:
            vectors, strength = self.steering
            self._built = (rows, self.executor.steering([vectors] * rows, [strength] * rows))
        return self._built[1]


def search(
    lm: LanguageModel,
    prompt_text: str,
    query: str,
    scorers: Scorers,
    settings: SearchSettings,
    *,
    budget: float,
    max_new_tokens: int,
    prefix: Sequence[int] = (),
    steering: tuple[dict[int, torch.Tensor], float] | None = None,
    generator: torch.Generator | None = None,
    start: SearchStart | None = None,
    executor: Executor | None = None,
) -> Generator[None, None, SearchResult]:
    """Search for an answer to `prompt_text` (chat-formatted) continuing `prefix`.

    `query` is what the cost and reward models read as the prompt; `steering` (vectors,
    strength) stays on for every forward pass when the gate fired. `start`: the row's own
    state after `prefix` (the worker's); without it the prompt's ids and `prefix` are run
    once.
    """
    if settings.score == "critic" and scorers.critic is None:
        raise ValueError("score='critic' needs a trained critic")
    if scorers.reward is None:
        raise ValueError(f"score={settings.score!r} needs a reward model")
    started = time.monotonic()
    executor = executor or Executor(lm)
    steered = _Steered(executor, steering)
    prefix = list(prefix)
    if start is None:
        ids = lm.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        out = executor.prefill(
            [list(ids) + prefix], steering=steered.hooks(1), hidden=True, logprobs=len(prefix)
        )
        assert out.hidden is not None
        lps = out.logprobs[0].tolist() if out.logprobs is not None else []
        start = SearchStart(out.state, out.hidden, lps)
        yield
    state, hidden = start.state, start.hidden
    beams = [_Beam(prefix, 0, logprobs=start.logprobs)]
    finished: list[_Beam] = []
    penalised: set[int] = set()
    result = SearchResult(None, None, None)
    while beams and result.rounds < settings.rounds:
        result.rounds += 1
        # Every round samples K x S candidates, spread over the beams still growing.
        parents = sorted(
            (beams[i % len(beams)] for i in range(settings.beams * settings.samples)),
            key=lambda b: b.row,
        )
        grown = executor.reserve(
            executor.take(state, [beam.row for beam in parents]), settings.width
        )
        grown_hidden = hidden[[beam.row for beam in parents]].clone()
        limits = [max_new_tokens - (len(b.tokens) - len(prefix)) for b in parents]
        new, ended, new_lps = yield from _sample_chunk(
            executor, steered, grown, grown_hidden, settings, penalised, generator, limits
        )
        result.sampled += sum(map(len, new))
        candidates = [p.tokens + t for p, t in zip(parents, new, strict=True)]
        logprobs = [
            None if p.logprobs is None else p.logprobs + lp
            for p, lp in zip(parents, new_lps, strict=True)
        ]
        done = [
            e or len(c) - len(prefix) >= max_new_tokens
            for c, e in zip(candidates, ended, strict=True)
        ]
        texts = [str(lm.tokenizer.decode(c, skip_special_tokens=True)) for c in candidates]
        costs = _path_costs(lm, scorers.cost, query, parents, new, texts, settings.check)
        scores = _scores(
            executor, scorers, settings, query, texts, logprobs, costs, budget, grown_hidden, done
        )
        result.candidates += len(texts)
        within = [i for i, c in enumerate(costs) if c <= budget]
        if not within and settings.strict and settings.resample:
            for tokens in new:  # the tokens that took these candidates over budget
                penalised.update(tokens)
            result.resampled += 1
            continue
        ranked = sorted(within if settings.strict else range(len(texts)), key=lambda i: -scores[i])
        keep: list[int] = []
        for i in ranked:
            if done[i]:
                finished.append(_Beam(candidates[i], -1, scores[i], costs[i]))
            elif len(keep) < settings.beams:
                keep.append(i)
        best_finished = max((b.score for b in finished), default=None)
        # A beam that already scores below a finished answer cannot win: stop growing it.
        keep = [i for i in keep if best_finished is None or scores[i] > best_finished]
        state, hidden = executor.select(grown, keep), grown_hidden[keep]
        beams = [
            _Beam(candidates[i], row, scores[i], costs[i], logprobs[i])
            for row, i in enumerate(keep)
        ]
    # Out of rounds: a beam still growing is an answer cut at the search's length.
    pool = [b for b in finished + beams if len(b.tokens) > len(prefix) or not settings.strict]
    if settings.strict:
        pool = [b for b in pool if b.cost <= budget]
    if pool:
        best = max(pool, key=lambda b: b.score)
        result.tokens, result.cost, result.score = best.tokens, best.cost, best.score
    result.timings_ms["search"] = 1000 * (time.monotonic() - started)
    return result


def _path_costs(
    lm: LanguageModel,
    cost: CostModel,
    query: str,
    parents: list[_Beam],
    new: list[list[int]],
    texts: list[str],
    every: int,
) -> list[float]:
    """Each candidate's path cost: its parent's, or more if a check inside the new tokens (at
    every multiple of `every` tokens of the answer, as the stream's chunks fall whatever the
    search's width, and at the candidate's end) costs more; one cost call for all of them."""
    checks: list[tuple[int, str]] = []
    for i, (parent, tokens) in enumerate(zip(parents, new, strict=True)):
        first = every - len(parent.tokens) % every  # new tokens up to the next multiple
        for mark in range(first, len(tokens), every):
            text = lm.tokenizer.decode(parent.tokens + tokens[:mark], skip_special_tokens=True)
            checks.append((i, str(text)))
        checks.append((i, texts[i]))
    scores = cost.cost([query] * len(checks), [text for _, text in checks])
    costs = [p.cost for p in parents]
    for (i, _), score in zip(checks, scores, strict=True):
        costs[i] = max(costs[i], score)
    return costs


def _sample_chunk(
    executor: Executor,
    steered: _Steered,
    state: Prefilled,
    hidden: torch.Tensor,
    settings: SearchSettings,
    penalised: set[int],
    generator: torch.Generator | None,
    limits: list[int],
) -> Generator[None, None, tuple[list[list[int]], list[bool], list[list[float]]]]:
    """Sample up to `width` tokens per row, in place on `state` and `hidden` (each row's
    last hidden state); returns the tokens, whether each row ended its turn, and each
    token's log-probability under the logits it was sampled from."""
    rows = len(limits)
    eos = set(executor.lm.eos_token_ids)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    ended = [False] * rows
    alive = [limit > 0 for limit in limits]
    for _ in range(settings.width):
        if not any(alive):
            break
        picked, lps = executor.sample(
            state.next_logits,
            temperature=settings.temperature,
            top_p=settings.top_p,
            generator=generator,
            penalised=sorted(penalised),
            penalty=settings.penalty,
        )
        picked_list, lp_list = picked.tolist(), lps.tolist()
        stepped = []
        for row in (r for r in range(rows) if alive[r]):
            token = int(picked_list[row])
            if token in eos:
                ended[row], alive[row] = True, False
                continue
            tokens[row].append(token)
            logprobs[row].append(float(lp_list[row]))
            stepped.append(row)
            alive[row] = len(tokens[row]) < limits[row]
        if not stepped:
            break
        fed = torch.full_like(picked, executor.pad)
        fed[stepped] = picked[stepped]
        out = executor.step(state, fed, steering=steered.hooks(rows), hidden=True)
        state.cache, state.attention_mask = out.state.cache, out.state.attention_mask
        state.next_logits = out.state.next_logits
        assert out.hidden is not None
        hidden[stepped] = out.hidden[stepped]
        yield
    return tokens, ended, logprobs


def _scores(
    executor: Executor,
    scorers: Scorers,
    settings: SearchSettings,
    query: str,
    texts: list[str],
    logprobs: list[list[float] | None],
    costs: list[float],
    budget: float,
    hidden: torch.Tensor,
    done: list[bool],
) -> list[float]:
    if settings.score == "lagrangian":
        rewards = _rewards(scorers, query, texts, logprobs)
        return [r - settings.lagrange * c for r, c in zip(rewards, costs, strict=True)]
    # Over budget is worth `unsafe_value` whatever it says: score only the rest.
    scores = [settings.unsafe_value] * len(texts)
    within = [i for i, c in enumerate(costs) if c <= budget]
    if not within:
        return scores
    rewards = _rewards(scorers, query, [texts[i] for i in within], [logprobs[i] for i in within])
    corrections = [0.0] * len(within)
    if settings.score == "critic":
        # V = the prefix's augmented reward + the critic's correction; a finished answer is
        # worth its reward: the critic only estimates where unfinished ones are heading.
        assert scorers.critic is not None
        z = [budget - costs[i] for i in within]
        corrections = executor.critic_values(scorers.critic, hidden[within], z)
    for i, r, v in zip(within, rewards, corrections, strict=True):
        scores[i] = r if done[i] else r + v
    return scores


def _rewards(
    scorers: Scorers, query: str, texts: list[str], logprobs: list[list[float] | None]
) -> list[float]:
    """The reward of each text; a reward that reads fluency from token log-probabilities
    (the proxy reward) gets them as sampled, instead of running the texts through the model."""
    assert scorers.reward is not None
    if isinstance(scorers.reward, TokenReward):
        nlls = [-sum(lp) / len(lp) if lp else None for lp in logprobs]
        return scorers.reward.reward_with_nlls([query] * len(texts), texts, nlls)
    return scorers.reward.reward([query] * len(texts), texts)


def run(steps: Generator[None, None, SearchResult]) -> SearchResult:
    """Drive a search to its end (benchmarks, tests, a caller with nothing else to do)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


__all__ = [
    "Score",
    "Scorers",
    "SearchResult",
    "SearchSettings",
    "SearchStart",
    "path_cost",
    "run",
    "search",
]
