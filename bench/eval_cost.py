"""Cost models on human-labelled answers they never saw: the `test` split of each labelled set.

Each answer is scored as a served answer is held to its budget (`scoring.answer_costs`, what
`guardrail score` and the worker's stream checks compute: the highest cost at every 16-token
chunk boundary and at the end). Per set and cost model: AUROC of unsafe against safe answers
(HH-RLHF: pairwise accuracy, rejected over chosen, since its labels are a preference), and
TPR / FPR at the default budget. `coconot_pref` is all safe (compliant and over-refusing
answers to prompts that should be answered): its FPR is the false-alarm rate.

Models: the calibrated latent probe (`latent`), the MiniLM probe retrained on the same data
(`minilm`), and their combination (`max`: over budget when either is). Last, the cost of one
check on the benign path: the latent probe scored from states the worker already has, next
to a MiniLM check of the same answers, in one run (a ratio, not absolute times).

    python bench/eval_cost.py [--per-set 300] [--sets gptfuzz,diasafety,...]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from common import setup, table
from guardrail.budget.checks import answer_costs
from guardrail.budget.latent import answer_states
from guardrail.budget.scoring import DEFAULT_BUDGET
from guardrail.calibrate import labelled
from guardrail.calibrate.store import load_or_calibrate_safety
from guardrail.probes import auroc


def sample(name: str, n: int) -> list[labelled.Labelled]:
    items = labelled.load(name, "test")
    rng = random.Random(0)
    if name != "hh_rlhf":
        rng.shuffle(items)
        return items[:n]
    pairs = sorted({i.pair for i in items})
    rng.shuffle(pairs)
    keep = set(pairs[: n // 2])
    return [i for i in items if i.pair in keep]


def pairwise_accuracy(items: list[labelled.Labelled], costs: torch.Tensor) -> float:
    """HH-RLHF: the share of pairs whose rejected answer costs more than the chosen one."""
    by_pair: dict[int | None, dict[bool, float]] = {}
    for item, c in zip(items, costs.tolist(), strict=True):
        by_pair.setdefault(item.pair, {})[item.unsafe] = c
    pairs = [p for p in by_pair.values() if len(p) == 2]
    wins = sum(p[True] > p[False] for p in pairs) + 0.5 * sum(p[True] == p[False] for p in pairs)
    return wins / len(pairs)


def separation(items: list[labelled.Labelled], costs: torch.Tensor) -> str:
    unsafe = torch.tensor([i.unsafe for i in items])
    if items[0].set == "hh_rlhf":
        return f"{pairwise_accuracy(items, costs):.3f} (pairs)"
    if unsafe.all() or not unsafe.any():
        return "-"
    return f"{auroc(costs[unsafe], costs[~unsafe]):.3f}"


def rates(items: list[labelled.Labelled], over: torch.Tensor) -> tuple[str, str]:
    unsafe = torch.tensor([i.unsafe for i in items])
    tpr = f"{float(over[unsafe].float().mean()):.3f}" if unsafe.any() else "-"
    fpr = f"{float(over[~unsafe].float().mean()):.3f}" if (~unsafe).any() else "-"
    return tpr, fpr


def check_cost(lm: Any, models: Any, n: int = 64) -> list[list[Any]]:
    """Seconds per check: the latent probe on states the worker holds (a dot product) and on
    text (a pass of its own, as search candidates and offline scoring use), and MiniLM."""
    answers = sample("coconot_pref", n)
    prompts, texts = [a.prompt for a in answers], [a.response[:300] for a in answers]
    latent, minilm = models.cost(lm, "latent"), models.cost(lm, "minilm")
    states = answer_states(lm, prompts, texts, latent.layers, reads=(latent.read,))
    held = states[latent.read][:, 0]
    timings = {}
    for name, run in (
        ("latent, from decode states", lambda: latent.cost_of_states(held)),
        ("latent, from text", lambda: latent.cost(prompts, texts)),
        ("minilm, from text", lambda: minilm.cost(prompts, texts)),
    ):
        run()  # warm up
        started = time.perf_counter()
        run()
        timings[name] = (time.perf_counter() - started) / n
    base = timings["minilm, from text"]
    return [[name, f"{1e3 * t:.3f}", f"{t / base:.3f}"] for name, t in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=300)
    parser.add_argument("--sets", default=",".join(labelled.SETS))
    args = parser.parse_args()
    lm, calibration = setup()
    models = load_or_calibrate_safety(lm, calibration, progress=False)
    costs = {"latent": models.cost(lm, "latent"), "minilm": models.cost(lm, "minilm")}
    rows = []
    for name in args.sets.split(","):
        items = sample(name, args.per_set)
        queries, responses = [i.prompt for i in items], [i.response for i in items]
        scored = {
            model: torch.tensor(answer_costs(cost, queries, responses, tokenizer=lm.tokenizer))
            for model, cost in costs.items()
        }
        scored["max"] = torch.maximum(scored["latent"], scored["minilm"])
        for model, values in scored.items():
            tpr, fpr = rates(items, values > DEFAULT_BUDGET)
            unsafe = sum(i.unsafe for i in items)
            rows.append([name, model, len(items), unsafe, separation(items, values), tpr, fpr])
        print(table(["set", "cost model", "n", "unsafe", "AUROC", "TPR", "FPR"], rows[-3:]))
    print("\nHuman-labelled test splits (never calibrated on), budget", DEFAULT_BUDGET)
    print(table(["set", "cost model", "n", "unsafe", "AUROC", "TPR", "FPR"], rows))
    print("\nOne check on the benign path (64 CoCoNot answers), seconds per answer")
    print(table(["check", "ms", "ratio to minilm"], check_cost(lm, models)))


if __name__ == "__main__":
    main()
