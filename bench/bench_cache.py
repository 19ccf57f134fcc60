"""Caches: worker start from each artifact source; score-cache hit rates.

    .venv/bin/python bench/bench_cache.py [--redis-url redis://127.0.0.1:6379/0] [--cold]

Part 1 starts a worker several ways, each from an empty local artifact folder unless named:
a fresh machine (the calibration shipped with the package, copied to disk and Redis on the
way), warm Redis (a fresh disk, the artifacts read from Redis), warm disk (the folder the
first start filled) and, with `--cold`, cold (no shipped calibration: calibrates the gate and
the safety models from scratch, as any model but the embedded default does; about 17
minutes on 2 cores). A start is: load the model, load or make the gate calibration and the
safety models (cost model, critic), start the worker and answer one request.

Part 2 replays a repeated workload (requests drawn with a skew from a pool of distinct
prompt-answer pairs) through a batched scorer behind each score-cache backend and reports
the hit rate and the scoring time against no cache. The scorer is the calibrated probe read
on the answer text, a stand-in with the cost of a real forward pass; the served cost model
(`guardrail.budget.scoring.CachedCost`) sits behind the same `CachedScorer`.
"""

from __future__ import annotations

import argparse
import random
import secrets
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from common import advbench_test, table
from guardrail.cache import (
    CachedScorer,
    CountingScores,
    DirectoryStore,
    DiskScores,
    MemoryScores,
    RedisScores,
    RedisStore,
    Signer,
    TieredStore,
    shared_key,
)
from guardrail.calibrate.shipped import ShippedStore
from guardrail.calibrate.store import load_or_calibrate, load_or_calibrate_safety
from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model
from guardrail.serve.guard import Guard


def start_worker(model: str, store: Any) -> tuple[float, Any, Any]:
    started = time.perf_counter()
    lm = load_model(model)
    calibration = load_or_calibrate(lm, store=store, progress=False)
    safety = load_or_calibrate_safety(lm, calibration, store=store, progress=False)
    guard = Guard(lm, calibration, scorers=safety.scorers(lm))
    try:
        guard.generate_sync("Say hello.", max_new_tokens=4)
    finally:
        guard.close()
    return time.perf_counter() - started, lm, calibration


def workload(pool: Sequence[str], requests: int, seed: int = 0) -> list[str]:
    """Requests with a Zipf-like skew over the pool: popular prompts come back often."""
    weights = [1.0 / (rank + 1) for rank in range(len(pool))]
    return random.Random(seed).choices(list(pool), weights=weights, k=requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--distinct", type=int, default=64, help="pool of distinct texts")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="texts scored per call")
    parser.add_argument(
        "--cold", action="store_true", help="also start with no calibration anywhere (~17 min)"
    )
    args = parser.parse_args()
    redis.Redis.from_url(args.redis_url).ping()  # fail loudly: the bench is about Redis
    prefix = f"guardrail-bench-{uuid.uuid4().hex[:8]}"
    signer = Signer(shared_key() or secrets.token_hex(32).encode())

    with tempfile.TemporaryDirectory() as tmp:
        shared = RedisStore(args.redis_url, signer=signer, prefix=prefix)
        load_model(args.model)  # warm-up: lazy imports and the OS file cache, for every start
        first_disk = DirectoryStore(Path(tmp) / "first")
        fresh, lm, calibration = start_worker(
            args.model, TieredStore([first_disk, shared, ShippedStore()])
        )
        warm_disk = DirectoryStore(Path(tmp) / "warm")
        warm_redis, _, _ = start_worker(args.model, TieredStore([warm_disk, shared]))
        local, _, _ = start_worker(args.model, first_disk)
        starts = {
            "fresh machine (shipped calibration)": fresh,
            "warm Redis, empty disk": warm_redis,
            "warm local disk": local,
        }
        if args.cold:
            cold, _, _ = start_worker(args.model, DirectoryStore(Path(tmp) / "cold"))
            starts = {"cold (calibrates from scratch)": cold, **starts}
        slowest = max(starts.values())
        rows = [[name, seconds, slowest / seconds] for name, seconds in starts.items()]
        print(table(["worker start", "seconds", "speed-up vs the slowest"], rows))

        gate = calibration.gate

        def probe(texts: Sequence[str]) -> list[list[float]]:
            from guardrail.gate.vectors import gate_scores

            return [[float(s)] for s in gate_scores(lm, gate, texts)]

        pool = [f"{p}\n\nSure, here is how: step one." for p in advbench_test()[: args.distinct]]
        texts = workload(pool, args.requests)
        backends: dict[str, Any] = {
            "memory": MemoryScores(),
            "disk": DiskScores(Path(tmp) / "scores"),
            "redis": RedisScores(args.redis_url, signer=signer, prefix=prefix),
        }
        rows = []
        baseline = 0.0
        for name in ["none", *backends]:
            started = time.perf_counter()
            counter = CountingScores(backends[name]) if name != "none" else None
            scorer = (
                CachedScorer(probe, counter, name="probe", fingerprint=lm.fingerprint)
                if counter
                else probe
            )
            for i in range(0, len(texts), args.batch):
                scorer(texts[i : i + args.batch])
            seconds = time.perf_counter() - started
            baseline = baseline or seconds
            hit_rate = counter.hit_rate if counter else 0.0
            rows.append([name, hit_rate, seconds, baseline / seconds])
        print()
        print(f"{args.requests} scored texts, {len(set(texts))} distinct, batches of {args.batch}")
        print(table(["score cache", "hit rate", "seconds", "speed-up vs none"], rows))
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main()
