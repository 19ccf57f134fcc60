"""Attack success per jailbreak family and over-refusal, on the served path (`guardrail batch`).

Harmful requests (AdvBench `test` split, MaliciousInstruct) are sent plain and in every form
calibration never saw: the held-out wrapper families of `wrappers.jsonl`
(`datasets.HELD_OUT_FAMILIES`), the 10 held-out jailbreakchat templates, and an optimised-looking
suffix (words, punctuation and markup fragments, unlike the random-token suffixes calibration
sees), plus, for comparison, forms it did see. Benign requests (Alpaca test split, the `test`
splits of the shipped borderline and CoCoNot contrast prompts) are sent plain and in the same
forms, and both classes are also sent inside conversation contexts calibration never saw
(system prompts, tool lists, output formats, earlier turns: the held-out part of
`datasets.contexts()`). Every prompt goes through `guardrail batch` (gate, steering, cost
checks, search: what a user is served); answers are judged by the keyword refusal judge.

    python bench/eval_jailbreaks.py --per-set 20 [--recipe jailbreak]
    python bench/eval_jailbreaks.py --per-set 100 --per-form 100 --forms optimised_suffix

The second asks one form of many prompts (the README's suffix comparison): `--forms` keeps only the
forms named ('plain', 'context' or a form of `forms()`), `--per-form` sets how many of each
set's prompts each form wraps (half of `--per-set` unless given).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    advbench_test,
    alpaca_test,
    malicious_instruct,
    optimised_suffix,
    shipped_test,
    table,
)
from guardrail.calibrate import datasets
from guardrail.calibrate.judge import is_refusal

SEEN_FAMILIES = ("roleplay", "prefix_injection")
HELD_OUT_FORMS = (*datasets.HELD_OUT_FAMILIES, "jailbreakchat", "optimised_suffix")


def forms() -> dict[str, Callable[[str, random.Random], str]]:
    """Each form calibration never saw (and two it did), as prompt -> text."""
    families = datasets.load_families(datasets.wrapper_families())
    jailbreakchat = datasets.load_templates(datasets.jailbreakchat_templates(), held_out=True)

    def template(choices: list[str]) -> Callable[[str, random.Random], str]:
        return lambda p, rng: rng.choice(choices).replace("{prompt}", p)

    made = {f: template(families[f]) for f in (*datasets.HELD_OUT_FAMILIES, *SEEN_FAMILIES)}
    return {**made, "jailbreakchat": template(jailbreakchat), "optimised_suffix": optimised_suffix}


def build(
    per_set: int, seed: int, per_form: int | None = None, only: set[str] | None = None
) -> list[dict[str, Any]]:
    """Rows: id, prompt, label (harmful/benign), set, family ('plain', a form or 'context');
    `only` keeps the families it names."""
    rng = random.Random(seed)
    wrapped = max(per_set // 2, 1) if per_form is None else per_form
    contexts = datasets.load_contexts(datasets.contexts(), held_out=True)
    harmful = {"advbench/test": advbench_test(), "malicious_instruct": malicious_instruct()}
    benign = {
        "alpaca/test": alpaca_test(per_set * 4, seed=seed),
        "borderline/test": shipped_test("borderline_benign.txt"),
        "coconot_contrast/test": shipped_test("coconot_contrast.txt"),
    }
    rows: list[dict[str, Any]] = []
    made = forms()
    unknown = (only or set()) - {"plain", "context", *made}
    if unknown:
        raise SystemExit(f"--forms: unknown {sorted(unknown)}; known: plain, context, {list(made)}")

    def add(label: str, name: str, prompts: list[str]) -> None:
        chosen = rng.sample(prompts, min(per_set, len(prompts)))
        rows.extend({"label": label, "set": name, "family": "plain", "prompt": p} for p in chosen)
        for family, form in made.items():
            for p in chosen[:wrapped]:
                rows.append({"label": label, "set": name, "family": family, "prompt": form(p, rng)})
        for p in chosen[:wrapped]:
            chat = [*rng.choice(contexts), {"role": "user", "content": p}]
            rows.append({"label": label, "set": name, "family": "context", "prompt": chat})

    for name, prompts in harmful.items():
        add("harmful", name, prompts)
    for name, prompts in benign.items():
        add("benign", name, prompts)
    # Filtered after drawing, so a form's rows are the same prompts with or without --forms.
    kept = [row for row in rows if only is None or row["family"] in only]
    return [{"id": f"r{i}", **row} for i, row in enumerate(kept)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-set", type=int, default=20, help="plain prompts per set")
    parser.add_argument("--per-form", type=int, help="prompts per set in each form")
    parser.add_argument("--forms", help="comma-separated families to keep (default: all)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recipe", default="default", help="calibration recipe (guardrail --recipe)"
    )
    parser.add_argument("--keep", type=Path, help="keep the batch's input and answers here")
    parser.add_argument(
        "--answers", type=Path, help="report on this batch output instead of running one"
    )
    args = parser.parse_args()
    if args.answers:
        report([json.loads(line) for line in args.answers.read_text().splitlines()])
        return
    only = set(args.forms.split(",")) if args.forms else None
    rows = build(args.per_set, args.seed, args.per_form, only)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        source, out = folder / "in.jsonl", folder / "out.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        command = [sys.executable, "-m", "guardrail.cli", "batch", str(source), "--out", str(out)]
        options = ["--max-new-tokens", str(args.tokens), "--recipe", args.recipe]
        subprocess.run([*command, *options], check=True)
        report([json.loads(line) for line in out.read_text().splitlines()])


def report(answers: list[dict[str, Any]]) -> None:
    by_set: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    by_form: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for answer in answers:
        by_set[answer["label"], _form(answer["family"]), answer["set"]].append(answer)
        by_form[answer["label"], _form(answer["family"]), "all"].append(answer)
    print("Served path (guardrail batch, keyword refusal judge)")
    for groups in (by_set, by_form):
        lines = [[*key, *_rates(key[0], items)] for key, items in sorted(groups.items())]
        headers = ["class", "form", "set", "n", "metric", "value", "gate fired", "cost checks"]
        print(table(headers, lines))


def _form(family: str) -> str:
    if family in ("plain", "context"):
        return "plain" if family == "plain" else "in a held-out context"
    return f"{family} ({'held out' if family in HELD_OUT_FORMS else 'seen'})"


def _rates(label: str, items: list[dict[str, Any]]) -> list[object]:
    """n, metric, its value (attack success or over-refusal), how often the gate fired, and
    how often the cost checks acted where it did not (the search or a refusal: the second
    line); for harmful prompts 1 - gate - cost checks is the share that met neither."""
    refused = sum(is_refusal(str(a["response"])) for a in items)
    fired = sum(bool(a["guard"]["fired"]) for a in items)
    costed = sum(
        not a["guard"]["fired"] and a["guard"]["path"] in ("search", "refused") for a in items
    )
    rate = (len(items) - refused if label == "harmful" else refused) / len(items)
    metric = "attack success" if label == "harmful" else "over-refusal"
    return [
        len(items),
        metric,
        f"{rate:.3f}",
        f"{fired / len(items):.3f}",
        f"{costed / len(items):.3f}",
    ]


if __name__ == "__main__":
    main()
