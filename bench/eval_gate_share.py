"""How the gate's false-alarm budget should be split between its two parts, chosen on `dev`.

The shipped gate fires on the higher of its pooled probe (the last prompt token) and its
token read (a per-token probe kept at its highest over the user's turn). Calibration holds
each part to half the target FPR on harmless `select` prompts (`token_read.fit_token_read`),
then sets the gate's threshold at the target on the two together. The pooled part catches
plain requests best, the token read requests a suffix or a template hides: the share trades
one against the other. This bench re-weighs the shipped parts at several shares and reports
each (and the shipped gate as it is, first) on prompts calibration fitted nothing on and did
not set its thresholds on: the `dev` splits, plain, in the wrapper templates calibration may
use (its own and jailbreakchat's), with random-token suffixes and, on the benign side, the
borderline and CoCoNot contrast prompts. Held-out forms and `test` splits stay for
reporting (eval_jailbreaks.py, eval_safety.py).

    python bench/eval_gate_share.py [--shares 0.5,0.6,0.7,0.8,0.9]
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import torch

from common import setup, table
from guardrail.calibrate import datasets
from guardrail.calibrate.gate import CalibrationConfig
from guardrail.calibrate.token_read import extra_templates
from guardrail.gate.readout import Gate
from guardrail.gate.vectors import read_states
from guardrail.probes import threshold_at_fpr
from guardrail.runtime.model import LanguageModel


def parts(
    lm: LanguageModel, gate: Gate, texts: list[str], desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled probe's and the token read's scores of each prompt (the gate's is their max)."""
    assert gate.tokens is not None
    states = read_states(
        lm,
        [lm.prompt([{"role": "user", "content": t}]) for t in texts],
        reads=gate.reads,
        layers=gate.layers,
        tokens=gate.tokens.per_layer(),
        desc=desc,
    )
    pooled = replace(gate, tokens=None).scores(states)
    return pooled, gate.tokens.scores(states["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shares", default="0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    rng = random.Random(args.seed)
    lm, calibration = setup()
    gate = calibration.gate
    if gate.tokens is None:
        raise SystemExit("the shipped gate has no token read: nothing to split")

    harmful = datasets.load_many([str(p) for p in datasets.default_harmful()])
    harmless = datasets.load_many([str(p) for p in datasets.default_harmless()])
    seen = [
        *datasets.load_templates(datasets.default_templates()),
        *datasets.load_templates(datasets.wrapper_families()),
    ]
    chat_templates = extra_templates()

    def suffix(prompt: str) -> str:
        ids = [rng.randrange(256, len(lm.tokenizer)) for _ in range(rng.randint(12, 28))]
        return f"{prompt} {lm.tokenizer.decode(ids).strip()}"

    def forms(prompts: list[str]) -> dict[str, list[str]]:
        return {
            "plain": prompts,
            "wrapped": [rng.choice(seen).replace("{prompt}", p) for p in prompts],
            "jailbreakchat": [rng.choice(chat_templates).replace("{prompt}", p) for p in prompts],
            "suffix": [suffix(p) for p in prompts],
        }

    dev_harmful = datasets.take_split(harmful, "dev")
    dev_harmless = datasets.take_split(harmless, "dev")
    dev_harmless = rng.sample(dev_harmless, min(150, len(dev_harmless)))
    sets: dict[tuple[str, str], list[str]] = {
        ("harmful", form): texts for form, texts in forms(dev_harmful).items()
    }
    sets |= {("benign", form): texts for form, texts in forms(dev_harmless).items()}
    sets["benign", "borderline"] = datasets.take_split(
        datasets.load_prompts(datasets.borderline_benign()), "dev"
    )
    sets["benign", "coconot_contrast"] = datasets.take_split(
        datasets.load_prompts(datasets.data_file("coconot_contrast.txt")), "dev"
    )
    # calibration's harmless `select` prompts as asked (it also reads 30% in contexts)
    select = datasets.take_split(datasets.load_many(CalibrationConfig().harmless), "select")
    base = parts(lm, gate, select, "select harmless")
    scores = {key: parts(lm, gate, texts, "/".join(key)) for key, texts in sets.items()}

    rows = [
        [
            "as shipped",
            *(float(gate.fires(torch.maximum(p, q)).float().mean()) for p, q in scores.values()),
        ]
    ]
    t = args.target_fpr
    for share in [float(s) for s in args.shares.split(",")]:
        at = (
            threshold_at_fpr(base[0], share * t),
            threshold_at_fpr(base[1], (1 - share) * t) if share < 1 else float("inf"),
        )
        combined = {k: torch.maximum(p - at[0], q - at[1]) for k, (p, q) in scores.items()}
        threshold = threshold_at_fpr(torch.maximum(base[0] - at[0], base[1] - at[1]), t)
        rows.append(
            [f"{share:.1f}", *(float((c > threshold).float().mean()) for c in combined.values())]
        )
    names = [f"{'TPR' if k == 'harmful' else 'FPR'} {f} ({len(sets[k, f])})" for k, f in sets]
    print(
        f"\nGate FPR split, pooled share of {t:.0%} FPR on {len(select)} harmless `select`"
        f" prompts; dev splits ({time.perf_counter() - started:.0f} s)\n"
    )
    print(table(["pooled share", *names], rows))


if __name__ == "__main__":
    main()
