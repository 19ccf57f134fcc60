"""Human-labelled answers for training and judging cost models: (prompt, response, unsafe).

Read from a data folder laid out as `../shared/data` (each set with its SOURCE.md and licence;
`GUARDRAIL_LABELLED_DATA` or an explicit `root` points at it). A seeded sample of the `fit`
and `select` splits ships in the package (`guardrail/data/cost_answers.jsonl`, written by
`python -m guardrail.calibrate.labelled`, attribution in `cost_answers.SOURCE.md`) for
calibration on any machine; `test` never ships, and `bench/eval_cost.py` reads it where it lies.

Splits: `fit` trains, `select` picks layers, probe and scale, `test` is only reported. A set
with its own splits keeps them (DiaSafety's train/val/test; GPTFuzz's train questions 0-79
against its evaluate questions 80-99); the others are split by a hash of the prompt
(`datasets.split_of`: its `select` and `dev` buckets are `select` here), so every answer to
one conversation stays in one split.

- `gptfuzz`: answers of Vicuna, ChatGPT and Llama-2 to jailbreak prompts, labelled by hand
  (jailbroken = unsafe). The jailbreak template is not recorded: the prompt is the question.
- `diasafety`: chit-chat replies labelled Safe/Unsafe in context.
- `hh_rlhf`: HH-RLHF harmless-base test pairs: the last assistant turn of `rejected` (less
  harmless) is unsafe, of `chosen` safe; `pair` joins the two. It is a preference, not an
  absolute label: judge it by pairwise accuracy.
- `moderation`: OpenAI's moderation eval texts (unsafe: any category flagged) as the
  response to an empty request.
- `coconot_pref`: compliant and over-refusing answers to CoCoNot's contrast prompts, which
  should be answered: both are safe (false alarms a cost model must not raise).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from guardrail.calibrate import datasets
from guardrail.errors import InputError

SPLITS = ("fit", "select", "test")
SETS = ("gptfuzz", "diasafety", "hh_rlhf", "moderation", "coconot_pref")
_HASH_SPLIT = {"fit": "fit", "select": "select", "dev": "select", "test": "test"}


@dataclass(frozen=True)
class Labelled:
    set: str
    prompt: str  # the last user message (what a cost model reads as the prompt)
    response: str
    unsafe: bool
    pair: int | None = None  # HH-RLHF: chosen and rejected answers of one conversation


def data_root(root: str | Path | None = None) -> Path:
    """The labelled-data folder: `root`, else `GUARDRAIL_LABELLED_DATA`, else ../shared/data
    beside the checkout."""
    found = root or os.environ.get("GUARDRAIL_LABELLED_DATA")
    path = Path(found) if found else Path(__file__).resolve().parents[3] / "shared" / "data"
    if not path.is_dir():
        raise InputError(
            f"labelled data folder {str(path)!r} not found; set GUARDRAIL_LABELLED_DATA to "
            "a folder laid out as ../shared/data"
        )
    return path


def _hash_split(text: str) -> str:
    return _HASH_SPLIT[datasets.split_of(text)]


def _gptfuzz(root: Path) -> Iterator[tuple[str, Labelled]]:
    base = root / "gptfuzz_labeled_responses"
    with open(base / "questions" / "question_list.csv", encoding="utf-8", newline="") as f:
        questions = {row["index"]: row["text"].strip() for row in csv.DictReader(f)}
    for name in ("train", "evaluate"):
        with open(base / "responses_labeled" / f"{name}.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                question = questions[row["question"]]
                if name == "evaluate":
                    split = "test"
                else:  # train questions never test
                    split = "select" if _hash_split(question) == "test" else _hash_split(question)
                yield split, Labelled("gptfuzz", question, row["Response"], row["label"] == "1")


def _diasafety(root: Path) -> Iterator[tuple[str, Labelled]]:
    for name, split in (("train", "fit"), ("val", "select"), ("test", "test")):
        rows = json.loads((root / "diasafety" / f"{name}.json").read_text(encoding="utf-8"))
        for row in rows:
            unsafe = row["label"] == "Unsafe"
            yield split, Labelled("diasafety", row["context"], row["response"], unsafe)


def _last_turns(transcript: str) -> tuple[str, str]:
    """(last human message, last assistant reply) of an HH-RLHF transcript."""
    head, _, reply = transcript.rpartition("\n\nAssistant:")
    human = head.rpartition("\n\nHuman:")[2]
    return human.strip(), reply.strip()


def _hh_rlhf(root: Path) -> Iterator[tuple[str, Labelled]]:
    path = root / "hh_rlhf_harmless_base_test" / "harmless-base" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            row = json.loads(line)
            prompt, chosen = _last_turns(row["chosen"])
            _, rejected = _last_turns(row["rejected"])
            if chosen == rejected or not chosen or not rejected:
                continue
            split = _hash_split(row["chosen"].rpartition("\n\nAssistant:")[0])
            yield split, Labelled("hh_rlhf", prompt, chosen, False, n)
            yield split, Labelled("hh_rlhf", prompt, rejected, True, n)


def _moderation(root: Path) -> Iterator[tuple[str, Labelled]]:
    path = root / "openai_moderation_eval" / "samples-1680.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = row.pop("prompt")
            unsafe = any(v == 1 for v in row.values())
            # By its opening, so that texts that differ only further on share a split.
            yield _hash_split(text[:200]), Labelled("moderation", "", text, unsafe)


def _coconot_pref(root: Path) -> Iterator[tuple[str, Labelled]]:
    with open(root / "coconot" / "coconot_pref.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            split = _hash_split(row["prompt"])
            for key in ("chosen", "rejected"):
                yield split, Labelled("coconot_pref", row["prompt"], row[key], False)


_READERS: dict[str, Callable[[Path], Iterator[tuple[str, Labelled]]]] = {
    "gptfuzz": _gptfuzz,
    "diasafety": _diasafety,
    "hh_rlhf": _hh_rlhf,
    "moderation": _moderation,
    "coconot_pref": _coconot_pref,
}


def load(name: str, split: str, root: str | Path | None = None) -> list[Labelled]:
    """One labelled set's answers in one split, in file order."""
    if name not in _READERS:
        raise InputError(f"unknown labelled set {name!r}; known: {', '.join(SETS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    folder = data_root(root)
    try:
        return [item for s, item in _READERS[name](folder) if s == split and item.response]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"labelled set {name!r} under {folder}: {exc}") from exc


SHIPPED = datasets.data_file("cost_answers.jsonl")
TRAIN_SETS = ("gptfuzz", "diasafety", "moderation", "coconot_pref")  # absolute labels
MAX_CHARS = 1000  # a shipped answer's first characters (a check reads the answer so far)


def write_shipped(path: Path = SHIPPED, per_split: dict[str, int] | None = None) -> int:
    """Write a seeded sample of each training set's `fit` and `select` splits; returns rows."""
    counts = per_split or {"fit": 300, "select": 120}
    rows = []
    for name in TRAIN_SETS:
        for split, n in counts.items():
            items = load(name, split)
            random.Random(f"{name}/{split}").shuffle(items)
            for item in items[:n]:
                row = {**asdict(item), "split": split, "response": item.response[:MAX_CHARS]}
                rows.append(json.dumps({k: v for k, v in row.items() if k != "pair"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return len(rows)


def shipped(split: str, path: Path = SHIPPED) -> list[Labelled]:
    """The shipped sample of one split (`fit` or `select`)."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            if row["split"] == split:
                items.append(
                    Labelled(row["set"], row["prompt"], row["response"], bool(row["unsafe"]))
                )
        except (ValueError, KeyError) as exc:
            raise InputError(f"{path}:{number}: {exc}") from exc
    return items


__all__ = [
    "SETS",
    "SHIPPED",
    "SPLITS",
    "TRAIN_SETS",
    "Labelled",
    "data_root",
    "load",
    "shipped",
    "write_shipped",
]

if __name__ == "__main__":
    print(f"wrote {write_shipped()} answers to {SHIPPED}")
