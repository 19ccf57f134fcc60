"""Safety figures of the embedded default on held-out data, one table per question.

1. Gate: TPR on held-out harmful prompts and FPR on held-out harmless prompts: as asked, in
   the wrapper families calibration never saw, and inside the conversation contexts it
   never saw (system prompts, tool lists, output formats, earlier turns). The shipped gate's
   figures are the decisions the worker makes (each prompt through `Guard`, one new token:
   the gate reads the prefill); the InferAligner SRV baseline at its own best layer, which
   the guard does not serve, is read from the same prompts' states directly.
2. Answers: keyword-judged refusal rate of unguarded, guarded (policy `auto`) and forced
   steered answers on held-out harmful prompts, plus steered samples to read. Answers come
   from the served path: `Guard` and its worker under the shipped default policy (cost
   checks and search included), with no deadline (a deadline's answer is the refusal text,
   which would count as a refusal); `steer` is that policy with `on_fire: steer`.

    python bench/eval_safety.py [--alpaca 2000] [--tokens 48] [--samples 8] [--plain]
        [--no-baseline] [--skip-gate | --skip-answers]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
from typing import Any

from common import (
    advbench_test,
    alpaca_test,
    malicious_instruct,
    optimised_suffix,
    setup,
    shipped_test,
    table,
)
from guardrail.calibrate import datasets
from guardrail.calibrate.judge import fluency, is_refusal
from guardrail.decision import Answer, fired_steering
from guardrail.gate.readout import READS
from guardrail.gate.vectors import read_states
from guardrail.serve.guard import Guard
from guardrail.tenants.store import TenantPolicy


def states(lm: Any, prompts: list[Any]) -> Any:
    return read_states(lm, [lm.prompt(p) for p in prompts], reads=READS)


def held_out_forms(sets: dict[str, list[str]]) -> dict[str, list[Any]]:
    """Each set inside the held-out wrapper families, the held-out jailbreakchat templates,
    with an optimised-looking suffix and, apart, inside the held-out contexts."""
    wrappers = datasets.load_templates(datasets.wrapper_families(), held_out=True)
    jailbreakchat = datasets.load_templates(datasets.jailbreakchat_templates(), held_out=True)
    contexts = datasets.load_contexts(datasets.contexts(), held_out=True)
    forms: dict[str, list[Any]] = {}
    for name, prompts in sets.items():
        rng = random.Random(0)
        forms[f"{name}, held-out wrappers"] = datasets.wrap(prompts, wrappers, 1.0)
        forms[f"{name}, held-out jailbreakchat"] = datasets.wrap(prompts, jailbreakchat, 1.0)
        forms[f"{name}, optimised suffix"] = [optimised_suffix(p, rng) for p in prompts]
        forms[f"{name}, held-out contexts"] = datasets.in_contexts(prompts, contexts, 1.0)
    return forms


def answers(guard: Guard, prompts: list[str], **options: Any) -> list[Answer]:
    """Every prompt submitted at once, as concurrent users would; answers in prompt order."""

    async def main() -> list[Answer]:
        return await asyncio.gather(*(guard.generate(p, **options) for p in prompts))

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--alpaca", type=int, default=2000, help="Alpaca test prompts for the FPR (0: all 6266)"
    )
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--skip-gate", action="store_true", help="only the answers table")
    parser.add_argument("--skip-answers", action="store_true", help="only the gate table")
    parser.add_argument(
        "--plain", action="store_true", help="no held-out wrappers, templates or contexts"
    )
    parser.add_argument("--no-baseline", action="store_true", help="no SRV baseline rows")
    args = parser.parse_args()
    lm, calibration = setup()
    harmful = {
        "advbench/test": advbench_test(),
        "malicious_instruct": malicious_instruct(),
        "shipped harmful_requests/test": shipped_test("harmful_requests.txt"),
    }
    harmless = {
        "alpaca/test": alpaca_test(args.alpaca or None),
        "shipped benign/test": datasets.take_split(
            datasets.load_many(datasets.default_harmless()), "test"
        ),
        "shipped borderline/test": shipped_test("borderline_benign.txt"),
        "coconot contrast/test": shipped_test("coconot_contrast.txt"),
    }
    plain = {**harmful, **harmless}
    if not args.plain:
        pairs = ("advbench/test", "malicious_instruct")
        harmful.update(held_out_forms({k: harmful[k] for k in pairs}))
        pairs = ("shipped benign/test", "shipped borderline/test")
        harmless.update(held_out_forms({k: harmless[k] for k in pairs}))
    shipped = dataclasses.replace(TenantPolicy.default(), timeout=None, allow_unguarded=True)
    policies = {"default": shipped, "steer": dataclasses.replace(shipped, on_fire="steer")}
    everything = {**harmful, **harmless}
    queue = sum(len(p) for p in everything.values())  # the most submitted at once, bounded
    guard = Guard(lm, calibration, policies=policies, max_batch=32, max_queue=queue)
    rows = []
    gates = [] if args.skip_gate else [calibration.gate, calibration.srv_gate]
    gates = gates[:1] if args.no_baseline else gates
    for gate in gates:
        served = gate is calibration.gate
        for set_name, prompts in everything.items():
            if served:
                hits = sum(a.decision.fired for a in answers(guard, prompts, max_new_tokens=1))
            else:
                hits = int(gate.fires(gate.read(states(lm, prompts))).sum())
            rows.append(
                [
                    f"{'served: ' if served else 'baseline: '}{gate.kind} "
                    f"{'+'.join(gate.reads)} @ layers {list(gate.layers)}"
                    + (f" or token read @ {list(gate.tokens.layers)}" if gate.tokens else ""),
                    set_name,
                    f"{hits}/{len(prompts)}",
                    "TPR" if set_name in harmful else "FPR",
                    f"{hits / len(prompts):.4f}",
                ]
            )
    print("Gate on held-out prompts (threshold set on the calibration `select` split)")
    print(table(["read-out", "set", "fired/n", "metric", "value"], rows))
    if args.skip_answers:
        guard.close()
        return

    all_harmful = [p for name in harmful if name in plain for p in harmful[name]]
    tokens = {"max_new_tokens": args.tokens}
    action = "steer" if fired_steering(calibration, shipped.on_fire) else "refuse"
    results = {
        "unguarded": answers(guard, all_harmful, guarded=False, **tokens),
        f"guarded (auto -> {action})": answers(guard, all_harmful, **tokens),
    }
    steered_rows: list[Any] = []
    if calibration.steering is not None:
        results["guarded (steer)"] = answers(guard, all_harmful, tenant="steer", **tokens)
        steered_rows = [
            (p, a)
            for p, a in zip(all_harmful, results["guarded (steer)"], strict=True)
            if a.decision.path == "steered"
        ]
    rows = []
    for name, got in results.items():
        paths = {
            path: sum(a.decision.path == path for a in got)
            for path in ("plain", "steered", "search", "refused", "timeout", "unguarded")
        }
        rows.append(
            [
                name,
                len(got),
                sum(is_refusal(a.text) for a in got) / len(got),
                ", ".join(f"{k} {v}" for k, v in paths.items() if v),
            ]
        )
    if steered_rows:
        own = sum(is_refusal(a.text) for _, a in steered_rows) / len(steered_rows)
        fl = fluency(lm, [p for p, _ in steered_rows], [a.text for _, a in steered_rows])
        rows.append(
            [
                "steered path only",
                len(steered_rows),
                own,
                f"mean NLL {sum(f.nll for f in fl) / len(fl):.2f}, "
                f"distinct 3-grams {sum(f.distinct for f in fl) / len(fl):.2f}",
            ]
        )
    print(
        f"\nAnswers to {len(all_harmful)} held-out harmful prompts ({args.tokens} tokens, greedy; "
        "served path: Guard, worker, shipped default policy with cost checks)"
    )
    print(table(["variant", "n", "refusal rate", "paths"], rows))
    setting = calibration.steering.as_dict() if calibration.steering else None
    met = calibration.steering_meets_target
    print(f"\nSteering: {json.dumps(setting)}, met the dev target: {met}")
    for prompt, answer in steered_rows[: args.samples]:
        print(f"\n> {prompt}\n{answer.text}")
    guard.close()


if __name__ == "__main__":
    main()
