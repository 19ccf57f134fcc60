"""InferenceGuard as the worker serves it, against its baselines, on held-out prompts.

For each method: safety rate (returned answer within budget under the calibrated cost model
at every `check` tokens and at its end, as the guard's stream checks it), mean proxy reward
(of all answers, and of those within budget), mean cost (the highest at those checks),
keyword refusal rate, candidates scored, tokens sampled, and p50 latency over base generation
of the same max tokens.

The guard's rows are the served path: one request at a time through a `LocalWorker` (the
gate forced off, so that every harmful prompt reaches the cost checks), which decodes, checks
each `check`-token chunk and, at the first chunk over budget, continues in the search from
the row's own KV cache (`SearchSettings`: K beams x S samples per `width` tokens), or ends
with the refusal text. base and steered go through the same worker (steered: the gate forced
to fire with `on_fire: steer`). The baselines are methods the guard does not serve, run
directly at equal compute: best-of-N samples N = K x S whole answers (`--bon` overrides),
the same number of tokens as a search of K x S candidates a round that reaches full length;
all rank by the same path cost:

- base: greedy, unguarded; steered: greedy with the calibrated steering;
- best-of-N, Lagrangian: N full samples, pick max reward - lambda * cost;
- best-of-N, augmented: N full samples, pick max reward-if-within-budget;
- beam, augmented: K beams x S samples per `width` tokens from the start, ranked by augmented
  reward (no budget filter);
- InferenceGuard without critic: the worker's search ranked by augmented reward;
- InferenceGuard with critic: the same, ranked by the latent critic.

Under each table: InferenceGuard with critic minus best-of-N augmented in reward, paired by
prompt (mean and two standard errors).

Then: the share of benign requests that take the search path through the Guard with the
default policy (`--benign-search N` Alpaca test prompts), and the cost model's accuracy and
the critic's error on held-aside (`dev`) rollouts, from the calibration manifest.

    python bench/bench_search.py [--harmful 16] [--benign 16] [--tokens 48] [--benign-search 300]
        [--width 24 --check 16 --beams 4 --samples 6] [--bon N] [--budget 5] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import torch

from common import advbench_test, alpaca_test, malicious_instruct, setup, table
from guardrail.budget.scoring import DEFAULT_BUDGET
from guardrail.budget.search import SearchSettings, path_cost, run, search
from guardrail.calibrate.judge import is_refusal
from guardrail.calibrate.store import default_store, load_or_calibrate_safety
from guardrail.decision import DEFAULT_REFUSAL
from guardrail.runtime.forward import Sampling
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker, Request, answer_all

# A method the worker serves: (gate, search settings or None); the rest are run directly.
Served = tuple[str, SearchSettings | None]


def methods(args: argparse.Namespace) -> dict[str, SearchSettings | Served]:
    beam = SearchSettings(
        width=args.width,
        samples=args.samples,
        beams=args.beams,
        rounds=args.rounds,
        check=args.check,
    )
    n = args.bon or args.samples * args.beams
    bon = SearchSettings(
        width=args.tokens, samples=n, beams=1, rounds=1, strict=False, check=args.check
    )
    return {
        "base": ("off", None),
        "steered": ("steer", None),
        f"best-of-{n}, Lagrangian": SearchSettings(**{**vars(bon), "score": "lagrangian"}),
        f"best-of-{n}, augmented": SearchSettings(**{**vars(bon), "score": "augmented"}),
        "beam, augmented": SearchSettings(
            **{**vars(beam), "score": "augmented", "strict": False, "resample": False}
        ),
        "InferenceGuard, no critic": (
            "off",
            SearchSettings(**{**vars(beam), "score": "augmented"}),
        ),
        "InferenceGuard, critic": ("off", SearchSettings(**{**vars(beam), "score": "critic"})),
    }


def answer(
    lm: Any,
    worker: LocalWorker,
    scorers: Any,
    method: SearchSettings | Served,
    prompt: str,
    tokens: int,
    seed: int,
    budget: float,
) -> tuple[list[int], int, int]:
    """The answer's tokens, the candidates scored to find it and the tokens sampled."""
    if isinstance(method, tuple):
        gate, settings = method
        request = Request(
            prompt,
            Sampling(max_new_tokens=tokens, seed=seed),
            gate_threshold=float("-inf") if gate == "steer" else float("inf"),
            on_fire="steer",
            budget=budget if settings else None,
            search=settings,
        )
        [item] = answer_all(worker, [request], timeout=3600)
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        assert item.outcome is not None
        decision = item.outcome.decision
        assert gate != "steer" or decision.path == "steered", decision
        out = lm.tokenizer(item.outcome.text, add_special_tokens=False)["input_ids"]
        return out, decision.candidates, decision.new_tokens + decision.search_tokens
    result = run(
        search(
            lm,
            lm.format_chat(prompt),
            prompt,
            scorers,
            method,
            budget=budget,
            max_new_tokens=tokens,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    if result.tokens is None:
        refusal = lm.tokenizer(DEFAULT_REFUSAL, add_special_tokens=False)["input_ids"]
        return refusal, result.candidates, result.sampled
    return result.tokens, result.candidates, result.sampled


def compare(lm: Any, worker: LocalWorker, scorers: Any, args: argparse.Namespace) -> None:
    harmful = (
        advbench_test()[::3][: args.harmful // 2] + malicious_instruct()[::7][: args.harmful // 2]
    )
    sets = {"harmful": harmful, "benign": alpaca_test(args.benign, seed=5) if args.benign else []}
    for set_name, prompts in sets.items():
        if not prompts:
            continue
        rows = []
        results: dict[str, tuple[list[list[int]], list[float], list[int], list[int]]] = {}
        rewards_of: dict[str, list[float]] = {}
        for name, method in methods(args).items():
            if args.only and name != "base" and not any(o in name for o in args.only):
                continue
            answers, seconds, candidates, sampled = [], [], [], []
            for i, prompt in enumerate(prompts):
                started = time.perf_counter()
                tokens, scored, drawn = answer(
                    lm, worker, scorers, method, prompt, args.tokens, i, args.budget
                )
                seconds.append(time.perf_counter() - started)
                answers.append(tokens)
                candidates.append(scored)
                sampled.append(drawn)
            results[name] = (answers, seconds, candidates, sampled)
        base_p50 = statistics.median(results["base"][1])
        for name, (answers, seconds, candidates, sampled) in results.items():
            texts = [lm.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
            # Cost as the guard's stream would release the answer: the most at any chunk.
            costs = [
                path_cost(lm, scorers.cost, p, a, args.check)
                for p, a in zip(prompts, answers, strict=True)
            ]
            rewards = rewards_of[name] = scorers.reward.reward(prompts, texts)
            within = [r for r, c in zip(rewards, costs, strict=True) if c <= args.budget]
            rows.append(
                [
                    name,
                    len(within) / len(costs),
                    statistics.mean(rewards),
                    statistics.mean(within) if within else "-",
                    statistics.mean(costs),
                    sum(map(is_refusal, texts)) / len(texts),
                    statistics.mean(candidates),
                    statistics.mean(sampled),
                    statistics.median(seconds) / base_p50,
                ]
            )
        print(
            f"\n{set_name}: {len(prompts)} held-out prompts, {args.tokens} new tokens, "
            f"budget {args.budget}, base p50 {base_p50:.2f} s"
        )
        print(
            table(
                [
                    "method",
                    "safety rate",
                    "reward",
                    "reward in budget",
                    "cost",
                    "refusals",
                    "candidates",
                    "tokens sampled",
                    "p50 / base",
                ],
                rows,
            )
        )
        print(paired_difference(rewards_of))
        if args.show:
            for name, (answers, *_) in results.items():
                shown = lm.tokenizer.decode(answers[0], skip_special_tokens=True).strip()
                print(f"  {name}: {shown[:150]!r}")


def paired_difference(rewards: dict[str, list[float]]) -> str:
    """InferenceGuard with critic minus best-of-N augmented, prompt by prompt."""
    bon = next(
        (r for name, r in rewards.items() if name.endswith("augmented") and "best" in name), None
    )
    ours = rewards.get("InferenceGuard, critic")
    if bon is None or ours is None or len(ours) < 2:
        return "reward, InferenceGuard critic - best-of-N augmented: needs both methods"
    diffs = [a - b for a, b in zip(ours, bon, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    return (
        f"reward, InferenceGuard critic - best-of-N augmented (paired by prompt): "
        f"{statistics.mean(diffs):+.3f} +- {2 * se:.3f} (2 s.e.)"
    )


def benign_search_rate(lm: Any, calibration: Any, n: int, tokens: int) -> None:
    prompts = alpaca_test(n, seed=11)
    guard = Guard(lm, calibration, max_batch=16, max_queue=n + 1)

    async def all_answers() -> list[Any]:
        # All n are queued at once: no deadline, so that the last ones measure the paths the
        # default policy takes, not the 120 s deadline spent waiting in the queue.
        answers = (guard.generate(p, max_new_tokens=tokens, timeout=None) for p in prompts)
        return await asyncio.gather(*answers)

    answers = asyncio.run(all_answers())
    guard.close()
    paths: dict[str, int] = {}
    for a in answers:
        paths[a.decision.path] = paths.get(a.decision.path, 0) + 1
    over = sum((a.decision.cost or 0) > DEFAULT_BUDGET for a in answers)
    print(
        f"\nbenign through the Guard (default policy, {tokens} new tokens): "
        f"{n} Alpaca test prompts, paths {json.dumps(paths)}, "
        f"search rate {paths.get('search', 0) / n:.4f}, answers over budget {over}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--harmful", type=int, default=16)
    parser.add_argument("--benign", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--width", type=int, default=24, help="tokens per search round")
    parser.add_argument(
        "--check", type=int, default=16, help="tokens between cost checks (the guard's chunk)"
    )
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--bon", type=int, default=0, help="best-of-N's N (default: beams x samples, equal tokens)"
    )
    parser.add_argument("--benign-search", type=int, default=300)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only", nargs="*", default=[], help="run base and the methods whose names contain these"
    )
    parser.add_argument("--show", action="store_true", help="print each method's first answer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm, calibration = setup()
    models = load_or_calibrate_safety(lm, calibration, store=default_store())
    print(
        "cost model and critic on held-aside dev rollouts:", json.dumps(models.manifest["report"])
    )
    scorers = models.scorers(lm)
    if args.harmful or args.benign:
        worker = LocalWorker(lm, calibration, scorers=scorers, chunk_tokens=args.check, join=False)
        try:
            compare(lm, worker, scorers, args)
        finally:
            worker.close()
    if args.benign_search:
        benign_search_rate(lm, calibration, args.benign_search, 64)


if __name__ == "__main__":
    main()
