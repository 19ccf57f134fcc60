"""Load through the HTTP server with the official `openai` client: 1, 8, 32 and 128 clients.

    .venv/bin/python bench/bench_server.py [--requests 64] [--tokens 16] [--stream-every 4]

Starts `guardrail serve`'s app on loopback over the embedded model and its stored
calibration (calibrating first if there is none), then for each level of concurrency sends
the same `--requests` requests (at least two per client; the prompts of
examples/prompts.jsonl, benign and harmful, in turn; every `--stream-every`-th one
streamed) from that many concurrent clients.
Reported per level: throughput (and its ratio to one client), p50 and p99 latency, and the
lost (an exception) and malformed (no text, no decision, or a stream without its closing
event) responses, which must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import openai
import uvicorn

from common import setup, table
from guardrail.serve.guard import Guard
from guardrail.serve.http import ApiKeys, create_app

PROMPTS = [
    json.loads(line)["prompt"]
    for line in (Path(__file__).parents[1] / "examples" / "prompts.jsonl").read_text().splitlines()
    if line.strip()
]


def serve(guard: Guard) -> tuple[str, uvicorn.Server]:
    app = create_app(guard, ApiKeys.from_env("default=bench-key"), model_id="bench")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


async def one(client: openai.AsyncOpenAI, prompt: str, tokens: int, stream: bool) -> str:
    """'ok', 'malformed' or 'lost' for one request."""
    messages: Any = [{"role": "user", "content": prompt}]
    try:
        if stream:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="bench", messages=messages, max_tokens=tokens, stream=True
                )
            ]
            closing = chunks[-1] if chunks else None
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            ok = bool(text) and closing is not None and "guard" in (closing.model_extra or {})
        else:
            reply = await client.chat.completions.create(
                model="bench", messages=messages, max_tokens=tokens
            )
            ok = bool(reply.choices[0].message.content) and "guard" in (reply.model_extra or {})
    except Exception as exc:
        if os.environ.get("BENCH_DEBUG"):
            print(f"lost: {exc!r}")
        return "lost"
    return "ok" if ok else "malformed"


async def level(url: str, clients: int, requests: int, tokens: int, every: int) -> list[Any]:
    client = openai.AsyncOpenAI(base_url=url, api_key="bench-key", max_retries=0, timeout=600)
    todo = list(range(requests))
    latencies: list[float] = []
    outcomes: list[str] = []

    async def worker() -> None:
        while todo:
            i = todo.pop(0)
            started = time.perf_counter()
            outcomes.append(await one(client, PROMPTS[i % len(PROMPTS)], tokens, i % every == 0))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - started
    await client.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return [
        clients,
        requests / seconds,
        statistics.median(latencies),
        p99,
        outcomes.count("lost"),
        outcomes.count("malformed"),
        requests,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--stream-every", type=int, default=4)
    parser.add_argument("--levels", default="1,8,32,128")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm, calibration = setup()
    guard = Guard(lm, calibration, max_batch=16, max_queue=512)
    url, server = serve(guard)
    rows = []
    try:
        for clients in (int(n) for n in args.levels.split(",")):
            requests = max(args.requests, 2 * clients)  # every client keeps a request in flight
            rows.append(asyncio.run(level(url, clients, requests, args.tokens, args.stream_every)))
    finally:
        server.should_exit = True
        guard.close()
    base = rows[0][1]
    print(
        f"max({args.requests}, 2 x clients) requests per level, {args.tokens} new tokens at "
        f"most, every {args.stream_every}th streamed; {len(PROMPTS)} prompts (benign and "
        "harmful) in turn"
    )
    print(
        table(
            ["clients", "requests", "req/s", "vs 1 client", "p50 s", "p99 s", "lost", "malformed"],
            [[r[0], r[6], r[1], r[1] / base, r[2], r[3], r[4], r[5]] for r in rows],
        )
    )


if __name__ == "__main__":
    main()
