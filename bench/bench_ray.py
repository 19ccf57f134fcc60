"""The Ray Serve backend against the in-process worker, and what a replica crash costs.

Load run (default): the same workload (`--requests` held-out prompts, every fourth one from
AdvBench's test split, the rest from Alpaca's; `--tokens` new tokens, greedy) answered by
`--clients` closed-loop clients through a `Guard` over (1) a `LocalWorker`, (2) a `RayWorker`
with 1 replica and (3) with 2 replicas, each model thread with `--threads` torch threads.
Ray's start and the replicas' model loading are not timed; one warm-up round is not either.

    python bench/bench_ray.py [--requests 32] [--tokens 16] [--clients 8] [--threads 1]

Fault run (`--fault`): 2 replicas under the same closed-loop load for `--window` seconds,
then one replica's actor is killed (`ray.kill`) while the load goes on; Serve's controller
starts a replacement. Reported: answers, requests that failed with an error (the tenant's
`fail_mode: error`, so they raise instead of answering with the refusal text), answers whose
decision is not a guarded one (must be 0), the largest latency against the tenant's
deadline, and throughput in the `--window` seconds before the kill and after the recovery.

    python bench/bench_ray.py --fault [--window 10] [--deadline 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from typing import Any

from common import advbench_test, alpaca_test, setup, table
from guardrail.serve.guard import Guard
from guardrail.serve.ray import RayWorker
from guardrail.serve.worker import LocalWorker
from guardrail.tenants.store import TenantPolicy

GUARDED_PATHS = {"plain", "steered", "refused", "timeout"}


def prompts(n: int) -> list[str]:
    harmful, harmless = advbench_test(), alpaca_test(n)
    return [harmful[i % len(harmful)] if i % 4 == 3 else harmless[i] for i in range(n)]


async def closed_loop(
    guard: Guard, workload: list[str], clients: int, tokens: int
) -> tuple[float, list[float]]:
    """Requests per second and each request's latency, `clients` requests in flight."""
    latencies: list[float] = []
    todo = iter(workload)

    async def client() -> None:
        for prompt in todo:  # shared: each client takes the next prompt when it is free
            started = time.perf_counter()
            await guard.generate(prompt, max_new_tokens=tokens)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(workload) / (time.perf_counter() - started), latencies


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def load_run(args: argparse.Namespace) -> None:
    lm, calibration = setup()
    workload = prompts(args.requests)
    options = {"torch_threads": args.threads}
    variants: list[tuple[str, Any]] = [
        ("local worker", lambda: LocalWorker(lm, calibration, **options)),
        ("ray, 1 replica", lambda: RayWorker(replicas=1, worker_options=options)),
        ("ray, 2 replicas", lambda: RayWorker(replicas=2, worker_options=options)),
    ]
    rows: list[list[Any]] = []
    for label, make in variants:
        worker = make()
        guard = Guard(worker=worker)
        try:
            asyncio.run(closed_loop(guard, workload[: args.clients], args.clients, args.tokens))
            rate, latencies = asyncio.run(closed_loop(guard, workload, args.clients, args.tokens))
        finally:
            worker.close()
        base = rows[0][1] if rows else rate
        p50, p99 = quantile(latencies, 50), quantile(latencies, 99)
        base_p50 = rows[0][2] if rows else p50
        rows.append([label, rate, p50, p99, rate / base, p50 / base_p50])
        print(f"  {label}: {rate:.3f} req/s", flush=True)
    print(
        f"model {lm.name}, {args.requests} requests ({args.requests // 4} harmful), "
        f"{args.tokens} new tokens, {args.clients} closed-loop clients, "
        f"{args.threads} torch thread(s) per model thread"
    )
    print(
        table(["backend", "req/s", "p50 s", "p99 s", "throughput vs local", "p50 vs local"], rows)
    )


async def fault_load(
    guard: Guard, worker: RayWorker, args: argparse.Namespace
) -> tuple[list[tuple[float, float, str]], dict[str, float]]:
    """Closed-loop load through a replica kill; returns (start, end, outcome) per request
    and the times of the kill and of the recovery."""
    import ray
    from ray import serve

    workload = prompts(64)
    records: list[tuple[float, float, str]] = []
    stop = asyncio.Event()
    marks: dict[str, float] = {}

    async def client(k: int) -> None:
        i = k
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = await guard.generate(
                    workload[i % len(workload)], tenant="bench", max_new_tokens=args.tokens
                )
                d = answer.decision
                ok = d.guarded and d.path in GUARDED_PATHS and "error" not in (d.reason or "")
                outcome = "answered" if ok else f"unguarded or odd: {d.path} {d.reason}"
            except Exception as exc:
                outcome = f"error: {type(exc).__name__}: {str(exc)[:90]}"
            records.append((started, time.monotonic(), outcome))
            i += args.clients

    def running() -> int:
        app = serve.status().applications[worker.name]
        return int(app.deployments["GuardReplica"].replica_states.get("RUNNING", 0))

    async def chaos() -> None:
        await asyncio.sleep(args.window)
        victim = (await asyncio.to_thread(worker.replica_info))[0]
        marks["kill"] = time.monotonic()
        ray.kill(victim["actor"], no_restart=True)
        print(f"  killed {victim['actor_name']} (pid {victim['pid']})", flush=True)
        while await asyncio.to_thread(running) >= 2:  # until the controller notices
            if time.monotonic() - marks["kill"] > 60:
                break
            await asyncio.sleep(0.2)
        marks["noticed"] = time.monotonic()
        while await asyncio.to_thread(running) < 2:
            await asyncio.sleep(0.2)
        marks["recovered"] = time.monotonic()
        print(f"  recovered after {marks['recovered'] - marks['kill']:.1f} s", flush=True)
        await asyncio.sleep(args.window)
        stop.set()

    marks["start"] = time.monotonic()
    await asyncio.gather(chaos(), *(client(k) for k in range(args.clients)))
    return records, marks


def fault_run(args: argparse.Namespace) -> None:
    policy = TenantPolicy(timeout=args.deadline, fail_mode="error")
    worker = RayWorker(replicas=2, worker_options={"torch_threads": args.threads})
    guard = Guard(worker=worker, policies={"bench": policy})
    try:
        for prompt in prompts(args.clients):  # warm-up, untimed
            guard.generate_sync(prompt, tenant="bench", max_new_tokens=2)
        records, marks = asyncio.run(fault_load(guard, worker, args))
    finally:
        worker.close(drain=False)
    outcomes = Counter(outcome for _, _, outcome in records)

    def rate(start: float, end: float) -> float:
        done = sum(start <= e < end and o == "answered" for _, e, o in records)
        return done / (end - start)

    kill, recovered = marks["kill"], marks["recovered"]
    before = rate(kill - args.window, kill)
    after = rate(recovered, recovered + args.window)
    latencies = [e - s for s, e, _ in records]
    unguarded = sum(o.startswith("unguarded") for o in outcomes.elements())
    print(
        f"fault run: 2 replicas, {args.clients} closed-loop clients, {args.tokens} new tokens, "
        f"deadline {args.deadline:.0f} s; one replica killed at {kill - marks['start']:.1f} s, "
        f"controller saw it after {marks['noticed'] - kill:.1f} s, "
        f"replacement running after {recovered - kill:.1f} s"
    )
    rows = [
        ["requests answered (guarded decision)", outcomes["answered"]],
        ["requests failed with an error", sum(o.startswith("error") for o in outcomes.elements())],
        ["answers without a guarded decision", unguarded],
        ["max latency s (deadline)", f"{max(latencies):.2f} ({args.deadline:.0f})"],
        [f"answers/s in the {args.window:.0f} s before the kill", before],
        [f"answers/s in the {args.window:.0f} s after recovery", after],
        ["after / before", after / before if before else float("nan")],
    ]
    print(table(["fault run", "value"], rows))
    for outcome, count in sorted(outcomes.items()):
        if outcome != "answered":
            print(f"  {count} x {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model thread")
    parser.add_argument("--fault", action="store_true", help="the replica-kill run instead")
    parser.add_argument("--window", type=float, default=10.0, help="fault run: seconds measured")
    parser.add_argument("--deadline", type=float, default=30.0, help="fault run: tenant timeout")
    args = parser.parse_args()
    if args.fault:
        fault_run(args)
    else:
        load_run(args)


if __name__ == "__main__":
    main()
