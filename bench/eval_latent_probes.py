"""Which latent cost probe: read, layers, L2, training size, linear against a small MLP.

Issue 16 asks for the latent probe's form to be chosen by measurement. Every variant reads
the target model's states over (prompt, answer) with `answer_states`, as the shipped
`LatentCost` does (the first 96 answer tokens, as calibration reads them), and is trained
on the human-labelled `fit` answers alone (no rollouts: calibration adds the model's own;
this isolates the probe's form). It is chosen on `select` (mean over the sets with both
classes) and reported on `test` (the sample `eval_cost.py` scores). HH-RLHF is pairwise
accuracy (rejected over chosen) and is not trained on unless a row says so.

    python bench/eval_latent_probes.py [--fit-per-set 300,1500] [--select-per-set 400]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from eval_cost import pairwise_accuracy, sample
from torch import nn

from common import table
from guardrail.budget.latent import answer_states
from guardrail.calibrate import labelled
from guardrail.probes import auroc, fit_probe
from guardrail.runtime.model import EMBEDDED_DEFAULT, LanguageModel, load_model

LAYERS = [4, 8, 12, 16, 20, 24, 28]
SHIPPED = [4, 8, 12, 16]  # the layers calibration chooses among
TRAIN = ("gptfuzz", "diasafety", "moderation", "coconot_pref")
SCORED = ("gptfuzz", "diasafety", "moderation", "hh_rlhf")
Probe = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Part:
    """One split of one set: its answers and their states at `LAYERS`, per read."""

    items: list[labelled.Labelled]
    last: torch.Tensor
    mean: torch.Tensor

    @property
    def unsafe(self) -> torch.Tensor:
        return torch.tensor([i.unsafe for i in self.items])


def items_of(name: str, split: str, n: int) -> list[labelled.Labelled]:
    if split == "test":
        return sample(name, 200)
    items = labelled.load(name, split)
    if name != "hh_rlhf":
        random.Random(1).shuffle(items)
        return items[:n]
    pairs = sorted({i.pair for i in items})
    random.Random(1).shuffle(pairs)
    keep = set(pairs[: n // 2])
    return [i for i in items if i.pair in keep]


def read(lm: LanguageModel, items: list[labelled.Labelled]) -> Part:
    states = answer_states(
        lm,
        [i.prompt for i in items],
        [i.response for i in items],
        LAYERS,
        reads=("last", "mean"),
        max_answer_tokens=96,
    )
    return Part(items, states["last"][:, 0], states["mean"][:, 0])


def features(part: Part, how: str, layers: Sequence[int]) -> torch.Tensor:
    idx = [LAYERS.index(layer) for layer in layers]
    reads = (part.mean, part.last) if how == "both" else (getattr(part, how),)
    return torch.cat([r[:, idx].flatten(1) for r in reads], 1)


def separation(part: Part, logits: torch.Tensor) -> float:
    if part.items[0].set == "hh_rlhf":
        return pairwise_accuracy(part.items, logits)
    return auroc(logits[part.unsafe], logits[~part.unsafe])


def mlp(x: torch.Tensor, y: torch.Tensor, hidden: int = 256, epochs: int = 20) -> nn.Module:
    """A one-hidden-layer MLP on standardised states, class-balanced, with dropout."""
    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    net = nn.Sequential(
        nn.Dropout(0.2),
        nn.Linear(x.shape[1], hidden),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, 1),
    )
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    target = y.float()
    balance = (1 - target).sum() / target.sum()
    z = (x - mean) / std
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(z))
        for start in range(0, len(z), 128):
            rows = order[start : start + 128]
            loss = nn.functional.binary_cross_entropy_with_logits(
                net(z[rows]).squeeze(-1), target[rows], pos_weight=balance
            )
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    net.eval()

    class Standardised(nn.Module):
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return net((v - mean) / std).squeeze(-1)

    return Standardised()


def linear(weight: torch.Tensor, bias: float) -> Probe:
    return lambda v: v @ weight + bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-per-set", default="300,1500", help="training sizes, per set")
    parser.add_argument("--select-per-set", type=int, default=400)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.fit_per_set.split(","))
    lm = load_model(EMBEDDED_DEFAULT)
    data: dict[str, Part] = {}
    for name in labelled.SETS:
        data[f"fit/{name}"] = read(lm, items_of(name, "fit", sizes[-1]))
        data[f"select/{name}"] = read(lm, items_of(name, "select", args.select_per_set))
        data[f"test/{name}"] = read(lm, items_of(name, "test", 200))
        print(f"read {name}", flush=True)

    rows = []

    def score(label: str, how: str, layers: Sequence[int], apply: Probe) -> None:
        found = {}
        for split in ("select", "test"):
            for name in SCORED:
                part = data[f"{split}/{name}"]
                with torch.no_grad():
                    logits = apply(features(part, how, layers))
                found[f"{split}/{name}"] = separation(part, logits)
        mean = sum(found[f"select/{n}"] for n in SCORED) / len(SCORED)
        rows.append([label, round(mean, 3), *(round(v, 3) for v in found.values())])
        print(table(headers, rows[-1:]).splitlines()[-1], flush=True)

    def train(
        how: str, layers: Sequence[int], n: int, hh: bool = False
    ) -> tuple[torch.Tensor, ...]:
        names = TRAIN + (("hh_rlhf",) if hh else ())
        x = torch.cat([features(data[f"fit/{s}"], how, layers)[:n] for s in names])
        y = torch.cat([data[f"fit/{s}"].unsafe[:n] for s in names])
        return x, y

    headers = ["probe", "select mean"] + [f"{s}/{n}" for s in ("select", "test") for n in SCORED]
    big = sizes[-1]
    for n in sizes:
        for l2 in (0.1, 1.0):
            x, y = train("mean", SHIPPED, n)
            w, b = fit_probe(x[y], x[~y], l2=l2)
            score(f"linear, mean, L4-16, l2={l2:g}, {n}/set", "mean", SHIPPED, linear(w, b))
    for how, layers, label in (
        ("last", SHIPPED, "last, L4-16"),
        ("both", SHIPPED, "mean+last, L4-16"),
        ("mean", [16], "mean, L16"),
        ("mean", LAYERS, "mean, L4-28"),
    ):
        x, y = train(how, layers, big)
        w, b = fit_probe(x[y], x[~y], l2=0.3)
        score(f"linear, {label}, l2=0.3, {big}/set", how, layers, linear(w, b))
    x, y = train("mean", SHIPPED, big, hh=True)
    w, b = fit_probe(x[y], x[~y], l2=0.3)
    score(f"linear, mean, L4-16, l2=0.3, {big}/set + HH", "mean", SHIPPED, linear(w, b))
    for layers, label in ((SHIPPED, "L4-16"), (LAYERS, "L4-28")):
        x, y = train("mean", layers, big)
        net = mlp(x, y)
        score(f"MLP 256, mean, {label}, {big}/set", "mean", layers, net)
    print("\nHuman-labelled answers: select (chooses) and test (reports) splits")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
