"""Throughput of the shared worker at 1, 4, 16 and 64 concurrent clients vs sequential calls,
and the event loop's lag (p99) while the worker generates.

Every variant answers the same workload: `--requests` requests (prompt i and a budget between
`--tokens`/4 and `--tokens` new tokens, so rows finish at different steps). `clients`
closed-loop clients take the next request as soon as their last one is answered.
"sequential" answers the workload one request at a time: the same worker with a batch of
one, and one client.
The worker runs twice: `join` (waiting requests join the running batch between decode
steps) and `no join` (a new batch starts only when the last one has drained); that pair is
the measurement behind `LocalWorker`'s `join` default. Loop lag: a task that sleeps 1 ms and records
how late it wakes up, alive during the `join` run.

    python bench/bench_worker.py [--model embedded|tiny] [--tokens 32] [--requests 64] [--threads 1]

Every variant runs the model in the worker's thread with `--threads` intra-op threads: on a
busy shared 2-core machine, 2 OpenMP threads made every step up to ~9x slower (spin-waiting
against the other processes), in whichever thread ran it.

The embedded model uses its stored calibration when one exists for its fingerprint (any
calibration config); otherwise, and for `tiny`, a hand-made gate along a random direction
(as in tests/test_worker.py) which fires on some prompts. The table says which.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch

from common import table
from guardrail.calibrate import datasets
from guardrail.gate.artifact import Calibration, SteeringSetting
from guardrail.gate.readout import Gate
from guardrail.gate.vectors import last_token_states, num_layers
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker


def load(kind: str) -> tuple[Any, Calibration, str]:
    from guardrail.runtime.model import load_model, wrap_model

    if kind == "tiny":
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from guardrail.runtime.embedded import embedded_model_dir

        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=tokenizer.eos_token_id,
        )
        lm = wrap_model(LlamaForCausalLM(config).eval(), tokenizer, name="tiny-llama")
    else:
        lm = load_model()
        from guardrail.cache.artifacts import DirectoryStore
        from guardrail.runtime.paths import cache_root

        store = DirectoryStore(cache_root() / "artifacts")
        for folder in sorted(store.root.glob(f"{lm.fingerprint}-*")):
            found = store.load(folder.name)
            if found is not None:
                try:
                    return lm, Calibration.from_artifacts(found), "stored"
                except Exception:  # an older schema: try the next
                    continue
    return lm, hand_calibration(lm), "hand-made"


def hand_calibration(lm: Any) -> Calibration:
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    layer = num_layers(lm) // 2
    prompts = [lm.format_chat(p) for p in datasets.load_prompts(datasets.default_harmless()[0])]
    scores = last_token_states(lm, prompts[:64])[:, layer].float() @ direction
    threshold = float(scores.quantile(0.9))  # ~10% of these prompts fire
    gate = Gate(layers=(layer,), weight=direction, bias=0.0, threshold=threshold)
    return Calibration(
        gate=gate,
        srv_gate=gate,
        ssvs={"srv": direction.repeat(num_layers(lm), 1)},
        steering=SteeringSetting("srv", (layer,), 4.0),
        steering_meets_target=True,
    )


def budget(i: int, tokens: int) -> int:
    """Request i's max_new_tokens: spread over [tokens/4, tokens] so rows finish apart."""
    low = max(tokens // 4, 1)
    return low + (i * 7919) % (tokens - low + 1)


async def clients(
    guard: Guard, prompts: list[str], concurrency: int, requests: int, tokens: int
) -> tuple[float, list[float], list[float]]:
    """Requests per second with `concurrency` closed-loop clients, latencies, loop lags."""
    lags: list[float] = []
    latencies: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    workload = iter(range(requests))

    async def client() -> None:
        for i in workload:  # shared: each client takes the next request when it is free
            started = time.perf_counter()
            await guard.generate(prompts[i % len(prompts)], max_new_tokens=budget(i, tokens))
            latencies.append(time.perf_counter() - started)

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    stop.set()
    await tick
    return requests / elapsed, latencies, lags


def sequential(
    lm: Any, calibration: Calibration, prompts: list[str], n: int, tokens: int, threads: int
) -> float:
    """Requests per second answered one at a time: one client, a worker with a batch of one."""
    guard = Guard(
        worker=LocalWorker(lm, calibration, max_batch=1, join=False, torch_threads=threads)
    )
    try:
        asyncio.run(guard.generate(prompts[0], max_new_tokens=2))  # warm-up, untimed
        return asyncio.run(clients(guard, prompts, 1, n, tokens))[0]
    finally:
        guard.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["embedded", "tiny"], default="embedded")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="the workload of every variant")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of the model thread"
    )
    args = parser.parse_args()
    lm, calibration, source = load(args.model)
    prompts = datasets.load_prompts(datasets.default_harmless()[-1])
    levels = [int(x) for x in args.levels.split(",")]
    seq = sequential(lm, calibration, prompts, args.requests, args.tokens, args.threads)
    rows = []
    for level in levels:
        results = {}
        for join in (True, False):
            guard = Guard(
                worker=LocalWorker(
                    lm,
                    calibration,
                    max_batch=args.max_batch,
                    max_queue=1024,
                    join=join,
                    torch_threads=args.threads,
                )
            )
            results[join] = asyncio.run(clients(guard, prompts, level, args.requests, args.tokens))
            guard.close()
            print(f"  {level} clients, join={join}: {results[join][0]:.3f} req/s", flush=True)
        rate, latencies, lags = results[True]
        p99 = statistics.quantiles(lags, n=100)[98] if len(lags) > 1 else float("nan")
        rows.append(
            [
                level,
                seq,
                rate,
                results[False][0],
                rate / seq,
                statistics.mean(latencies),
                statistics.mean(results[False][1]),
                1000 * p99,
            ]
        )
    print(
        f"model {lm.name} ({source} calibration), {max(args.tokens // 4, 1)}-{args.tokens} "
        "new tokens, "
        f"{args.requests} requests per variant, max batch {args.max_batch}, "
        f"{args.threads} torch thread(s) in the model thread"
    )
    print(
        table(
            [
                "clients",
                "sequential req/s",
                "worker req/s (join)",
                "worker req/s (no join)",
                "speedup (join)",
                "mean latency s (join)",
                "mean latency s (no join)",
                "loop lag p99 ms",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
