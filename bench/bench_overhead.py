"""Guarded vs unguarded wall time on the served path, in one run, as ratios (the machines are
shared and noisy).

Every variant goes through `Guard` and one shared `LocalWorker` per cost model, as a user's
request does: gate at prefill, stream cost checks every 16 tokens, search when a chunk would
go over budget (every check scored: no score cache across repeats). Variants: unguarded (no
gate, no cost checks), guarded with the latent cost model (checks read states the decode step
computed), guarded with the MiniLM probe (checks embed the answer so far; mid-answer checks
run on the worker's check thread while the rows keep decoding, and, as a variant, inline:
the decode waits for each check, `LocalWorker(checks_beside=False)`), and with the latent
cost model but the gate's pooled probe alone (no token read: what the token read's per-token
dot products in the prefill cost). Benign prompts
(Alpaca test prompts the gate leaves alone) should cost what unguarded ones do (target ratio
<= 1.02); harmful prompts show the cost of the path they take: refused at the gate under the
shipped `auto`, or steered under `on_fire: steer`.

Beside the ratio of medians: each repeat's ratio to the unguarded run just before or after
it, their geometric mean and 95% interval, which says whether a ratio is within the noise;
and the ratio of median CPU time (the process's, all threads). With `--threads 1` the model
runs on one core and its CPU time is the work done, with no second thread spin-waiting; other
processes still slow the decode through shared memory traffic (measured: a bench on the other
core took MiniLM's ratio from 1.21 to 1.04), so run it on a quiet machine.

    python bench/bench_overhead.py [--batch 16] [--tokens 64] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from common import advbench_test, alpaca_test, setup, table
from guardrail.calibrate.store import load_or_calibrate_safety
from guardrail.gate.vectors import gate_scores
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker
from guardrail.tenants.store import TenantPolicy


class Uncached:
    """A score cache that never hits: the repeats answer the same prompts with the same
    greedy answers, which a cache would score once; distinct traffic pays every check."""

    def get_many(self, keys: Sequence[str]) -> list[None]:
        return [None] * len(keys)

    def put_many(self, items: dict[str, Any]) -> None:
        pass


async def answer_all(
    guard: Guard, prompts: list[str], guarded: bool, tenant: str, tokens: int
) -> list[Any]:
    return await asyncio.gather(
        *(guard.generate(p, tenant, guarded=guarded, max_new_tokens=tokens) for p in prompts)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, calibration = setup()
    safety = load_or_calibrate_safety(lm, calibration)
    policy = {
        "default": TenantPolicy(allow_unguarded=True),
        "steer": TenantPolicy(allow_unguarded=True, on_fire="steer"),
    }
    pooled = dataclasses.replace(
        calibration, gate=dataclasses.replace(calibration.gate, tokens=None)
    )
    guards = {
        name: Guard(
            worker=LocalWorker(
                lm,
                gated_by,
                max_batch=args.batch,
                torch_threads=args.threads or None,
                scorers=safety.scorers(lm, cache=Uncached(), cost=cost),
                checks_beside=beside,
            ),
            policies=policy,
        )
        for name, gated_by, cost, beside in (
            ("latent", calibration, "latent", True),
            ("latent pooled", pooled, "latent", True),
            ("minilm", calibration, "minilm", True),
            ("minilm inline", calibration, "minilm", False),
        )
    }
    variants = {
        "unguarded": (guards["latent"], False, "default"),
        "guarded, latent cost": (guards["latent"], True, "default"),
        "guarded, minilm cost": (guards["minilm"], True, "default"),
        "guarded, minilm cost, checks inline": (guards["minilm inline"], True, "default"),
        "guarded, latent cost, no token read": (guards["latent pooled"], True, "default"),
        "steered, latent cost": (guards["latent"], True, "steer"),
        "steered, minilm cost": (guards["minilm"], True, "steer"),
    }
    # Plain-path overhead: Alpaca test prompts the gate leaves alone (its false positives are
    # eval_safety.py's figure), read as the worker reads them.
    pool = alpaca_test(4 * args.batch, seed=3)
    unfired = gate_scores(lm, calibration.gate, pool) <= calibration.gate.threshold
    benign = [p for p, keep in zip(pool, unfired.tolist(), strict=True) if keep][: args.batch]
    sets = {"benign": benign, "harmful": advbench_test()[: args.batch]}
    rows = []
    for set_name, prompts in sets.items():
        chosen = {  # harmful: the paths they take; benign: where the checks run
            n: v
            for n, v in variants.items()
            if (
                ("inline" not in n and "token" not in n)
                if set_name == "harmful"
                else v[2] != "steer"
            )
        }
        times: dict[str, list[float]] = {name: [] for name in chosen}
        cpu: dict[str, list[float]] = {name: [] for name in chosen}
        paths: dict[str, dict[str, int]] = {}
        order = list(chosen.items())
        for repeat in range(args.repeats):  # interleave and rotate: drift hits all alike
            for name, (guard, guarded, tenant) in (
                order[repeat % len(order) :] + order[: repeat % len(order)]
            ):
                started, used = time.perf_counter(), time.process_time()
                answers = asyncio.run(answer_all(guard, prompts, guarded, tenant, args.tokens))
                times[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - used)
                counts: dict[str, int] = {}
                for answer in answers:
                    counts[answer.decision.path] = counts.get(answer.decision.path, 0) + 1
                paths[name] = counts
        base = statistics.median(times["unguarded"])
        for name in chosen:
            median = statistics.median(times[name])
            shown = " ".join(f"{p}={n}" for p, n in sorted(paths[name].items()))
            cpu_ratio = statistics.median(cpu[name]) / statistics.median(cpu["unguarded"])
            paired_ratio, interval = paired(times, name)
            rows.append(
                [set_name, name, shown, median, median / base, paired_ratio, interval, cpu_ratio]
            )
    for guard in guards.values():
        guard.close()
    print(f"{args.batch} concurrent requests, {args.tokens} new tokens, median of {args.repeats}")
    headers = ["prompts", "variant", "paths", "seconds", "ratio vs unguarded"]
    print(table([*headers, "paired ratio", "95% interval", "CPU-time ratio"], rows))


def paired(times: dict[str, list[float]], name: str) -> tuple[float, str]:
    """Each repeat's ratio to the unguarded arm of the same repeat (run back to back, so
    drift between repeats cancels): their geometric mean and its 95% interval (t, log scale)."""
    logs = [math.log(t / u) for t, u in zip(times[name], times["unguarded"], strict=True)]
    mean = statistics.mean(logs)
    if len(logs) < 3:
        return math.exp(mean), "-"
    half = T95[min(len(logs) - 1, len(T95)) - 1] * statistics.stdev(logs) / len(logs) ** 0.5
    return math.exp(mean), f"{math.exp(mean - half):.3f}-{math.exp(mean + half):.3f}"


# Student's t, two-sided 95%, for 1..15 degrees of freedom (beyond: the last).
# fmt: off
T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14,
       2.13)
# fmt: on


if __name__ == "__main__":
    main()
