"""Attack success per jailbreak family and over-refusal, on the served path (`guardrail batch`).

Harmful requests (AdvBench `test` split, MaliciousInstruct) are sent plain and inside each
wrapper family that calibration never saw (`datasets.HELD_OUT_FAMILIES`), plus, for
comparison, families it did see. Benign requests (Alpaca test split, the `test` split of the
shipped borderline prompts, CoCoNot's contrast prompts that should be answered) are sent
plain and wrapped, and both classes are also sent inside conversation contexts calibration
never saw (system prompts, tool lists, output formats, earlier turns: the held-out part of
`datasets.contexts()`). Every prompt goes through `guardrail batch` (gate, steering, cost checks,
search: what a user is served); answers are judged by the keyword refusal judge.

    python bench/eval_jailbreaks.py --per-set 20
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import advbench_test, alpaca_test, malicious_instruct, shared, table
from guardrail.calibrate import datasets
from guardrail.calibrate.judge import is_refusal

SEEN_FAMILIES = ("roleplay", "prefix_injection")


def coconot_contrast() -> list[str]:
    path = shared("coconot", "coconot_contrast_eval.jsonl")
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def build(per_set: int, seed: int) -> list[dict[str, Any]]:
    """Rows: id, prompt, label (harmful/benign), set, family ('plain', a wrapper family or
    'context')."""
    rng = random.Random(seed)
    families = datasets.load_families(datasets.wrapper_families())
    contexts = datasets.load_contexts(datasets.contexts(), held_out=True)
    harmful = {"advbench/test": advbench_test(), "malicious_instruct": malicious_instruct()}
    borderline = datasets.take_split(datasets.load_prompts(datasets.borderline_benign()), "test")
    benign = {
        "alpaca/test": alpaca_test(per_set * 4, seed=seed),
        "borderline/test": borderline,
        "coconot_contrast": coconot_contrast(),
    }
    rows: list[dict[str, Any]] = []

    def add(label: str, name: str, prompts: list[str]) -> None:
        chosen = rng.sample(prompts, min(per_set, len(prompts)))
        rows.extend({"label": label, "set": name, "family": "plain", "prompt": p} for p in chosen)
        for family in (*datasets.HELD_OUT_FAMILIES, *SEEN_FAMILIES):
            for p in chosen[: max(per_set // 2, 1)]:
                template = rng.choice(families[family])
                rows.append(
                    {
                        "label": label,
                        "set": name,
                        "family": family,
                        "prompt": template.replace("{prompt}", p),
                    }
                )
        for p in chosen[: max(per_set // 2, 1)]:
            chat = [*rng.choice(contexts), {"role": "user", "content": p}]
            rows.append({"label": label, "set": name, "family": "context", "prompt": chat})

    for name, prompts in harmful.items():
        add("harmful", name, prompts)
    for name, prompts in benign.items():
        add("benign", name, prompts)
    return [{"id": f"r{i}", **row} for i, row in enumerate(rows)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-set", type=int, default=20, help="plain prompts per set")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = build(args.per_set, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        command = [sys.executable, "-m", "guardrail.cli", "batch", str(source), "--out", str(out)]
        subprocess.run([*command, "--max-new-tokens", str(args.tokens)], check=True)
        answers = [json.loads(line) for line in out.read_text().splitlines()]
    by_set: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    by_form: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for answer in answers:
        by_set[answer["label"], _form(answer["family"]), answer["set"]].append(answer)
        by_form[answer["label"], _form(answer["family"]), "all"].append(answer)
    print("Served path (guardrail batch, keyword refusal judge)")
    for groups in (by_set, by_form):
        lines = [[*key, *_rates(key[0], items)] for key, items in sorted(groups.items())]
        print(table(["class", "form", "set", "n", "metric", "value", "gate fired"], lines))


def _form(family: str) -> str:
    if family in ("plain", "context"):
        return "plain" if family == "plain" else "in a held-out context"
    return f"{family} ({'held out' if family in datasets.HELD_OUT_FAMILIES else 'seen'})"


def _rates(label: str, items: list[dict[str, Any]]) -> list[object]:
    """n, metric, its value (attack success or over-refusal) and how often the gate fired."""
    refused = sum(is_refusal(str(a["response"])) for a in items)
    fired = sum(bool(a["guard"]["fired"]) for a in items)
    rate = (len(items) - refused if label == "harmful" else refused) / len(items)
    metric = "attack success" if label == "harmful" else "over-refusal"
    return [len(items), metric, f"{rate:.3f}", f"{fired / len(items):.3f}"]


if __name__ == "__main__":
    main()
