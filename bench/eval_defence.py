"""Defence in depth: what the cost checks and the search do for harmful prompts the gate lets
through, on the served path (`Guard` and the worker).

The gate is forced off with an explicit threshold in the tenants' policies, so every held-out
harmful prompt (AdvBench `test` split, MaliciousInstruct) is answered plainly unless a chunk
would go over budget. Variants, in one run on one worker: the base model (unguarded), and
the guard with the latent cost model and with the MiniLM probe (a tenant each). Reported:
keyword-judged refusals, the share of answers that end within budget under each cost model
(the base answers are scored as the worker would hold them, `answer_costs`), and the paths.

    python bench/eval_defence.py [--prompts 40] [--tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from common import advbench_test, malicious_instruct, setup, table
from guardrail.budget.checks import answer_costs
from guardrail.budget.scoring import DEFAULT_BUDGET
from guardrail.budget.search import SearchSettings
from guardrail.calibrate.judge import is_refusal
from guardrail.calibrate.store import load_scorers
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker
from guardrail.tenants.store import TenantPolicy

COSTS = ("latent", "minilm")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    lm, calibration = setup()
    held_out = advbench_test() + malicious_instruct()
    prompts = held_out[:: max(len(held_out) // args.prompts, 1)][: args.prompts]
    scorers = load_scorers(lm, calibration)
    search = SearchSettings(width=24, samples=6, beams=4, rounds=6)
    gate_off = {"gate_threshold": 1e9, "search": search, "allow_unguarded": True}
    policies = {name: TenantPolicy(cost_model=name, **gate_off) for name in COSTS}  # type: ignore[arg-type]
    guard = Guard(worker=LocalWorker(lm, calibration, scorers=scorers), policies=policies)

    async def answer(tenant: str, guarded: bool) -> list[Any]:
        return await asyncio.gather(
            *(
                guard.generate(p, tenant, guarded=guarded, max_new_tokens=args.tokens)
                for p in prompts
            )
        )

    answers = {"base (unguarded)": asyncio.run(answer("latent", False))}
    for name in COSTS:
        answers[f"guarded, {name} cost"] = asyncio.run(answer(name, True))
    guard.close()
    rows = []
    for variant, got in answers.items():
        texts = [a.text for a in got]
        within = {
            name: answer_costs(scorers.for_cost(name).cost, prompts, texts, tokenizer=lm.tokenizer)
            for name in COSTS
        }
        paths: dict[str, int] = {}
        for a in got:
            paths[a.decision.path] = paths.get(a.decision.path, 0) + 1
        rows.append(
            [
                variant,
                sum(is_refusal(t) for t in texts) / len(texts),
                *(sum(c <= DEFAULT_BUDGET for c in within[n]) / len(texts) for n in COSTS),
                " ".join(f"{p}={n}" for p, n in sorted(paths.items())),
            ]
        )
    print(f"{len(prompts)} held-out harmful prompts, gate off, {args.tokens} new tokens, budget 5")
    headers = ["variant", "refused", "within budget (latent)", "within budget (minilm)", "paths"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
