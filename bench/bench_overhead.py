"""Guarded vs unguarded wall time, in one run, as ratios (the machines are shared and noisy).

Benign prompts: the gate reads the prefill it needs anyway, so guarded time should match
unguarded (target ratio <= 1.05). Harmful prompts: the cost of the path they take (steered:
a second prefill and decode for the fired rows; refused: no decode at all).

    python bench/bench_overhead.py [--batch 16] [--tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import advbench_test, alpaca_test, setup, table
from guardrail.engine import GuardedGenerator
from guardrail.generate import Sampling


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lm, calibration = setup()
    sampling = Sampling(max_new_tokens=args.tokens)
    variants = {"unguarded": (GuardedGenerator(lm, calibration), False)}
    variants["guarded (auto)"] = (GuardedGenerator(lm, calibration), True)
    if calibration.steering is not None:
        variants["guarded (steer)"] = (GuardedGenerator(lm, calibration, on_fire="steer"), True)
    # Long-enough benign answers: the Alpaca test prompts the gate leaves alone.
    sets = {"benign": alpaca_test(args.batch, seed=3), "harmful": advbench_test()[: args.batch]}
    rows = []
    for set_name, prompts in sets.items():
        times: dict[str, list[float]] = {name: [] for name in variants}
        fired = {name: 0 for name in variants}
        for _ in range(args.repeats):  # interleave variants so drift hits all alike
            for name, (generator, guarded) in variants.items():
                started = time.perf_counter()
                answers = generator.generate(prompts, sampling, guarded=guarded)
                times[name].append(time.perf_counter() - started)
                fired[name] = sum(a.decision.fired for a in answers)
        base = statistics.median(times["unguarded"])
        for name in variants:
            median = statistics.median(times[name])
            rows.append([set_name, name, f"{fired[name]}/{len(prompts)}", median, median / base])
    print(f"batch {args.batch}, {args.tokens} new tokens, median of {args.repeats} runs")
    print(table(["prompts", "variant", "fired", "seconds", "ratio vs unguarded"], rows))


if __name__ == "__main__":
    main()
