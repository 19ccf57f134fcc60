"""Faults under load through the HTTP server: Redis stopped and restarted, clients leaving
mid-stream. (A Ray replica killed under load: `bench/bench_ray.py --fault`.)

    .venv/bin/python bench/bench_faults.py [--clients 16] [--seconds 60] [--tokens 24]

A private redis-server (its own port) holds the cost-score cache and the calibration
artifacts; the server runs over the embedded model with a per-request deadline. Closed-loop
clients send distinct held-out prompts (Alpaca test and AdvBench test, so the cost cache
keeps missing and Redis stays on the request path); every third request streams, and every
other stream is dropped after its first chunk. Redis is stopped at 1/3 of the run and
started again at 2/3. Reported per phase: answers per second, p50 and max latency against
the deadline, errors, and answers that break the guard's contract (no decision, a decision
that is not guarded, or a cost over budget): that count must be 0. At the end no row may be
left in the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

import openai

from bench_server import serve
from common import advbench_test, alpaca_test, setup, table
from guardrail.budget.search import SearchSettings
from guardrail.cache.signing import SHARED_KEY_ENV, SHARED_KEY_FILE_ENV
from guardrail.serve.guard import Guard
from guardrail.tenants.store import TenantPolicy

DEADLINE = 20.0


def start_redis(port: int, folder: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def load(url: str, prompts: list[str], args: argparse.Namespace, log: list[Any]) -> None:
    client = openai.AsyncOpenAI(base_url=url, api_key="bench-key", max_retries=0, timeout=120)
    stop_at = time.monotonic() + args.seconds
    counter = [0]

    async def one(i: int) -> None:
        prompt = prompts[i % len(prompts)]
        messages: Any = [{"role": "user", "content": prompt}]
        started = time.monotonic()
        outcome, guard = "ok", None
        try:
            if i % 3 == 0:
                stream = await client.chat.completions.create(
                    model="bench", messages=messages, max_tokens=args.tokens, stream=True
                )
                async for chunk in stream:
                    if i % 6 == 0:  # leave after the first chunk
                        await stream.close()
                        outcome = "left"
                        break
                    guard = (chunk.model_extra or {}).get("guard", guard)
            else:
                reply = await client.chat.completions.create(
                    model="bench", messages=messages, max_tokens=args.tokens
                )
                guard = (reply.model_extra or {}).get("guard")
        except Exception:
            outcome = "error"
        if outcome == "ok" and not _within_contract(guard):
            outcome = "broken"
        log.append((started, time.monotonic() - started, outcome))

    async def client_loop() -> None:
        while time.monotonic() < stop_at:
            counter[0] += 1
            await one(counter[0])

    await asyncio.gather(*(client_loop() for _ in range(args.clients)))
    await client.close()


def _within_contract(guard: Any) -> bool:
    if not isinstance(guard, dict) or not guard.get("guarded"):
        return False
    if guard.get("path") in ("refused", "timeout") and guard.get("cost") is None:
        return guard.get("reason") is not None  # the refusal text, whose cost is known safe
    cost, budget = guard.get("cost"), guard.get("budget")
    return cost is not None and budget is not None and cost <= budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument(
        "--control", action="store_true", help="the same run with Redis left up (the baseline)"
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server on PATH")
    folder, port = tempfile.mkdtemp(prefix="bench-faults-"), free_port()
    redis = start_redis(port, folder)
    lm, calibration = setup()
    url_redis = f"redis://127.0.0.1:{port}/0"
    if not (os.environ.get(SHARED_KEY_ENV) or os.environ.get(SHARED_KEY_FILE_ENV)):
        os.environ[SHARED_KEY_ENV] = secrets.token_hex(32)  # without a key Redis is not used
    policy = TenantPolicy(timeout=DEADLINE, search=SearchSettings(width=8, rounds=4))
    guard = Guard(lm, calibration, redis_url=url_redis, policies={"default": policy}, max_batch=16)
    url, server = serve(guard)
    harmful = advbench_test() * 4
    benign = alpaca_test(len(harmful), seed=21)
    prompts = [p for pair in zip(benign, harmful, strict=True) for p in pair]
    log: list[Any] = []
    begun = time.monotonic()

    async def run() -> None:
        task = asyncio.create_task(load(url, prompts, args, log))
        await asyncio.sleep(args.seconds / 3)
        if not args.control:
            redis.terminate()
            redis.wait()
        await asyncio.sleep(args.seconds / 3)
        if not args.control:
            restarted.append(start_redis(port, folder))
        await task

    restarted: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(run())
        time.sleep(1.0)
        rows_left = guard.worker.active_rows  # type: ignore[attr-defined]
    finally:
        server.should_exit = True
        guard.close()
        for process in [redis, *restarted]:
            process.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    third = args.seconds / 3
    rows = []
    names = (
        ("first third", "second", "third")
        if args.control
        else ("Redis up", "Redis stopped", "Redis back")
    )
    for name, low in zip(names, (0.0, third, 2 * third), strict=True):
        phase = [r for r in log if low <= r[0] - begun < low + third]
        done = [r for r in phase if r[2] == "ok"]
        latencies = [r[1] for r in done] or [0.0]
        rows.append(
            [
                name,
                len(done) / third,
                statistics.median(latencies),
                max(latencies),
                sum(r[2] == "left" for r in phase),
                sum(r[2] == "error" for r in phase),
                sum(r[2] == "broken" for r in phase),
            ]
        )
    print(
        f"{args.clients} closed-loop clients, {args.seconds:.0f} s, {args.tokens} new tokens, "
        f"deadline {DEADLINE:.0f} s; "
        + (
            "Redis left up (control)"
            if args.control
            else f"Redis stopped at {third:.0f} s, back at {2 * third:.0f} s"
        )
    )
    print(
        table(
            ["phase", "answers/s", "p50 s", "max s", "left mid-stream", "errors", "broken"],
            rows,
        )
    )
    print(f"rows left in the worker after the run: {rows_left}")


if __name__ == "__main__":
    main()
