"""What a search costs against plain generation of the same length, short and long prompts.

The search should cost its candidates' new tokens (plus attention over the prompt), not a
pass over the prompt per candidate: its cost over plain generation should not grow with the
prompt's length. Through the worker (`LocalWorker`, one request at a time), per prompt:

- plain: the request unguarded, no budget, `16 + rounds x width` new tokens (prompts whose
  plain answer ends earlier are skipped: the comparison is at the same length);
- search: the same request with a budget nothing meets, so the first chunk check (after 16
  tokens) hands the row to the search lane, which runs all `rounds` rounds of `beams x
  samples` candidates of `width` tokens (every round resamples) and ends with the refusal.

The search's scorers cost what the calibrated ones cost to run (the cost model: a probe on
all-MiniLM-L6-v2 embeddings of each checked text; the proxy reward: relevance plus the
model's fluency), with a constant probe so that no calibration is needed; candidates are
ranked by augmented reward (the critic is a small MLP: its time is negligible).

Short prompts: benign requests (about 40 tokens with the chat template). Long: the same
requests inside GPTFuzz jailbreak templates (../shared/data, about 600 tokens), or, without
that data, inside shipped templates nested until that long.

    python bench/bench_search_rounds.py [--prompts 3] [--rounds 2] [--width 24]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from typing import Any

import torch

from common import SHARED, table
from guardrail.budget.scoring import ProbeCost, ProxyReward
from guardrail.budget.search import Scorers, SearchSettings
from guardrail.calibrate.datasets import data_file
from guardrail.runtime.embedder import Embedder
from guardrail.runtime.forward import Sampling
from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model
from guardrail.serve.worker import LocalWorker, Request, answer_all

CHUNK = 16


def short_prompts(n: int) -> list[str]:
    lines = data_file("benign_prompts.txt").read_text().splitlines()
    return [line for line in lines if line.strip()][:n]


def long_prompts(lm: Any, requests: list[str], target: int = 600) -> list[str]:
    """Each request inside the template that brings it closest to `target` tokens."""
    path = SHARED / "gptfuzz_labeled_responses" / "prompts" / "GPTFuzzer.csv"
    if path.is_file():
        with path.open(newline="") as f:
            templates = [row["text"] for row in csv.DictReader(f)]
        templates = [t for t in templates if "[INSERT PROMPT HERE]" in t]
    else:  # the shipped templates, nested until long enough
        shipped = data_file("jailbreak_templates.txt").read_text()
        lines = [t for t in shipped.splitlines() if "{prompt}" in t]
        nested = "{prompt}"
        while len(lm.tokenizer(nested)["input_ids"]) < target:
            nested = nested.replace("{prompt}", lines[len(nested) % len(lines)])
        templates = [nested.replace("{prompt}", "[INSERT PROMPT HERE]")]
    out = []
    for i, request in enumerate(requests):

        def distance(template: str, request: str = request) -> int:
            text = template.replace("[INSERT PROMPT HERE]", request)
            return abs(len(lm.prompt(text).ids) - target)

        sized = sorted(templates, key=distance)
        out.append(sized[i % min(len(sized), 3)].replace("[INSERT PROMPT HERE]", request))
    return out


def answer(worker: LocalWorker, request: Request) -> tuple[Any, float]:
    started = time.monotonic()
    [item] = answer_all(worker, [request], timeout=3600)
    if isinstance(item.outcome, BaseException):
        raise item.outcome
    return item.outcome, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--samples", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(EMBEDDED_DEFAULT)
    embedder = Embedder()
    cost = ProbeCost(embedder, torch.zeros(embedder.dim), 0.0)  # 5.0 for every text
    scorers = Scorers(cost, reward=ProxyReward(embedder, lm))
    worker = LocalWorker(lm, None, scorers=scorers, chunk_tokens=CHUNK, join=False)
    settings = SearchSettings(
        width=args.width,
        samples=args.samples,
        beams=args.beams,
        rounds=args.rounds,
        score="augmented",
    )
    new_tokens = CHUNK + args.rounds * args.width
    sampling = Sampling(max_new_tokens=new_tokens)
    short = short_prompts(4 * args.prompts)  # the first whose plain answers reach full length
    rows = []
    answer(worker, Request(short[0], Sampling(max_new_tokens=4), guarded=False))  # warm-up
    for name, prompts in (("short", short), ("long", long_prompts(lm, short))):
        plain, searched, search_ms, lengths = [], [], [], []
        for prompt in prompts:
            if len(plain) == args.prompts:
                break
            result, seconds = answer(worker, Request(prompt, sampling, guarded=False))
            if result.decision.new_tokens < new_tokens:
                continue  # an answer that ends early is not the same length
            plain.append(seconds)
            lengths.append(result.decision.prompt_tokens)
            request = Request(prompt, sampling, guarded=False, budget=1.0, search=settings)
            result, seconds = answer(worker, request)
            assert result.decision.path in ("search", "refused"), result.decision
            assert result.decision.rounds == args.rounds, result.decision
            searched.append(seconds)
            search_ms.append(result.decision.timings_ms.get("search", float("nan")))
        assert plain, f"no {name} prompt's plain answer reached {new_tokens} tokens"
        p50_plain, p50_search = statistics.median(plain), statistics.median(searched)
        rows.append(
            [
                name,
                int(statistics.median(lengths)),
                p50_plain,
                p50_search,
                statistics.median(search_ms) / 1000,
                p50_search / p50_plain,
            ]
        )
    worker.close()
    print(
        f"search: {args.rounds} rounds x {args.beams} beams x {args.samples} samples x "
        f"{args.width} tokens, after a {CHUNK}-token chunk; plain: {new_tokens} new tokens; "
        f"{len(plain)} prompts each, torch threads {torch.get_num_threads()}"
    )
    headers = [
        "prompts",
        "prompt tokens",
        "plain p50 s",
        "search p50 s",
        "search phase p50 s",
        "search / plain",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
