"""Prompt sets: the shipped defaults, user files, and stable splits.

Splits are assigned by a hash of each prompt's text, so a prompt stays in the same split
whatever file it comes from or whatever order it is in: calibration (`fit`, `select`, `dev`)
never sees the `test` split that evaluation reports on.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from guardrail.errors import InputError
from guardrail.tools import with_tools

# Percent of prompts in each split, in order: probe fitting, gate layer/threshold selection,
# steering selection, and held-aside evaluation.
SPLITS = {"fit": 50, "select": 20, "dev": 10, "test": 20}
_TEXT_KEYS = ("prompt", "instruction", "goal", "question", "text")


def data_file(name: str) -> Path:
    """A file shipped in `guardrail.data`, found wherever the package is installed."""
    return Path(str(importlib.resources.files("guardrail.data") / name))


def advbench() -> Path:
    """AdvBench harmful behaviours (Zou et al. 2023, MIT), shipped with the package."""
    return data_file("advbench_harmful_behaviors.csv")


def advbench_strings() -> Path:
    """AdvBench harmful strings (`target` column; MIT): unsafe text for the cost model."""
    return data_file("advbench_harmful_strings.csv")


def default_harmful() -> list[Path]:
    """AdvBench (imperatives) plus harmful requests in other forms, written for this project."""
    return [advbench(), data_file("harmful_requests.txt")]


def default_harmless() -> list[Path]:
    """Benign prompts written for this project, about a quarter of which merely sound harmful."""
    return [data_file(f"benign_prompts{suffix}.txt") for suffix in ("", "_2", "_3", "_4")]


def jailbreak_harmful() -> list[Path]:
    """The default harmful sets and three public ones in the forms real requests take: 1,000 of
    AART's adversarial prompts (personas, media, regions; CC-BY-4.0), CoCoNot's requests with
    safety concerns and GPTFuzz's questions (MIT)."""
    extra = ("aart_prompts.txt", "coconot_unsafe.txt", "gptfuzz_questions.txt")
    return [*default_harmful(), *map(data_file, extra)]


def jailbreak_harmless() -> list[Path]:
    """The default harmless sets, CoCoNot's requests that are odd but not harmful and its 1,298
    contrast prompts that sound harmful but should be answered (MIT), and the borderline set."""
    extra = ("coconot_benign.txt", "coconot_contrast.txt")
    return [*default_harmless(), *map(data_file, extra), borderline_benign()]


def borderline_benign() -> Path:
    """Benign requests that only sound harmful (where a gate over-refuses), for evaluation and
    opt-in calibration (`CalibrationConfig.harmless`)."""
    return data_file("borderline_benign.txt")


def default_templates() -> Path:
    """Jailbreak-style wrappers with a `{prompt}` slot, written for this project."""
    return data_file("jailbreak_templates.txt")


def wrapper_families() -> Path:
    """Jailbreak wrappers in 12 attack families (`family`, `template`), written for this project."""
    return data_file("wrappers.jsonl")


def jailbreakchat_templates() -> Path:
    """GPTFuzz's 77 jailbreak templates from jailbreakchat.com (MIT), 10 of them `held_out`."""
    return data_file("jailbreakchat_templates.jsonl")


# Wrapper families calibration never sees: evaluation measures transfer to an unseen wrapper.
HELD_OUT_FAMILIES = ("authority", "fake_dialogue", "grandma", "system_override")


def load_templates(path: str | Path, *, held_out: bool = False) -> list[str]:
    """Templates with one `{prompt}` slot from .txt (a line each) or a wrapper-family .jsonl;
    from .jsonl, those calibration may use, or with `held_out` only the others (a family in
    `HELD_OUT_FAMILIES`, or a line marked `"held_out": true`)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        templates = load_prompts(path)
    else:
        templates = [
            template
            for family, template, marked in _template_lines(path)
            if (family in HELD_OUT_FAMILIES or marked) == held_out
        ]
    if bad := [t for t in templates if t.count("{prompt}") != 1]:
        raise InputError(f"{path}: template without exactly one {{prompt}} slot: {bad[0][:60]!r}")
    return templates


def load_families(path: str | Path) -> dict[str, list[str]]:
    """Wrapper templates by family from a .jsonl of {"family": ..., "template": ...}."""
    families: dict[str, list[str]] = {}
    for family, template, _ in _template_lines(path):
        families.setdefault(family, []).append(template)
    return families


def _template_lines(path: str | Path) -> list[tuple[str, str, bool]]:
    """(family, template, marked `"held_out": true`) for each line of a wrapper .jsonl."""
    found = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            held_out = item.get("held_out", False)
            found.append((str(item["family"]), str(item["template"]), held_out))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}: line {number}: expected family and template") from exc
        if not isinstance(held_out, bool):
            raise InputError(f"{path}: line {number}: held_out must be true or false")
    return found


def contexts() -> Path:
    """Conversation contexts a request arrives in (system prompts, tool lists, output formats,
    earlier turns; `family` plus `messages` and/or `tools`), written for this project."""
    return data_file("contexts.jsonl")


Context = list[dict[str, str]]


def load_contexts(path: str | Path, *, held_out: bool = False) -> list[Context]:
    """The turns that come before the user's request, one list per context, tools rendered in
    the tool prompt format. A context falls in a split by a hash of its line: calibration uses
    those outside `test`, and with `held_out` only those in it (for evaluation)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    found: list[Context] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from exc
        messages = item.get("messages", []) if isinstance(item, dict) else None
        tools = item.get("tools", []) if isinstance(item, dict) else None
        if not isinstance(messages, list) or not isinstance(tools, list) or not messages + tools:
            raise InputError(f"{where}: expected an object with `messages` and/or `tools` lists")
        if not all(
            isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
            for m in messages
        ):
            raise InputError(f"{where}: each message needs string `role` and `content`")
        if (split_of(line) == "test") == held_out:
            found.append(with_tools([dict(m) for m in messages], tools))
    return found


def in_contexts(
    prompts: Sequence[str], contexts: Sequence[Context], fraction: float
) -> list[list[dict[str, str]]]:
    """A stable, hash-chosen `fraction` of the prompts as chats inside one of the contexts.

    Used on both classes, so the gate learns to judge the request and not what surrounds it.
    """
    chats = []
    for prompt in prompts:
        digest = int(hashlib.sha256(("context" + prompt).encode()).hexdigest(), 16)
        if contexts and digest % 1000 < fraction * 1000:
            context = contexts[(digest // 1000) % len(contexts)]
            chats.append([*context, {"role": "user", "content": prompt}])
    return chats


def jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; invalid JSON is an `InputError`
    naming the file and line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc


def load_many(paths: Sequence[str | Path]) -> list[str]:
    """Prompts from several files, in order, without duplicates."""
    return list(dict.fromkeys(p for path in paths for p in load_prompts(path)))


def wrap(prompts: Sequence[str], templates: Sequence[str], fraction: float) -> list[str]:
    """Put a stable, hash-chosen `fraction` of the prompts inside jailbreak-style templates.

    Used on both classes, so the gate learns to judge the request and not its wrapping.
    """
    wrapped = []
    for prompt in prompts:
        digest = int(hashlib.sha256(("wrap" + prompt).encode()).hexdigest(), 16)
        if templates and digest % 1000 < fraction * 1000:
            wrapped.append(templates[(digest // 1000) % len(templates)].replace("{prompt}", prompt))
    return wrapped


def with_suffixes(
    prompts: Sequence[str], tokenizer: Any, fraction: float, words: float = 0.0
) -> list[str]:
    """A stable, hash-chosen `fraction` of the prompts followed by 12-28 random tokens of the
    model's vocabulary: what optimised (GCG) and random-search adversarial suffixes look like
    to a read-out that has not seen them. A hash-chosen `words` share of those suffixes is
    drawn from whole-word and punctuation tokens instead (GCG suffixes read as words and
    markup more than as word pieces). Used on both classes, like `wrap`."""
    size = len(tokenizer)
    pieces, marks = _word_tokens(tokenizer) if words else ([], [])
    suffixed = []
    for prompt in prompts:
        digest = int(hashlib.sha256(("suffix" + prompt).encode()).hexdigest(), 16)
        if digest % 1000 < fraction * 1000:
            rng = random.Random(digest)
            length = rng.randint(12, 28)
            pick = int(hashlib.sha256(("words" + prompt).encode()).hexdigest(), 16)
            if pieces and marks and pick % 1000 < words * 1000:
                ids = [rng.choice(pieces if rng.random() < 0.7 else marks) for _ in range(length)]
            else:
                ids = [rng.randrange(256, size) for _ in range(length)]
            suffixed.append(f"{prompt} {tokenizer.decode(ids).strip()}")
    return suffixed


@functools.cache
def _word_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The vocabulary's common whole-word tokens (a space and 2-12 ASCII letters, among the
    first 12,000 merges: the words optimised suffixes are mostly made of) and its punctuation
    tokens (1-3 ASCII punctuation marks, with or without a space)."""
    pieces, marks = [], []
    for token_id in range(256, min(len(tokenizer), 12_256)):
        text = tokenizer.decode([token_id])
        if re.fullmatch(r" [A-Za-z]{2,12}", text):
            pieces.append(token_id)
        elif re.fullmatch(r" ?[!-/:-@\[-`{-~]{1,3}", text):
            marks.append(token_id)
    return pieces, marks


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from .txt (a line each), .csv, .json or .jsonl; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    prompts: list[str] = []
    if path.suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        key = next((k for k in _TEXT_KEYS if rows and k in rows[0]), None)
        if key is None:
            raise InputError(f"{path}: no column named one of {', '.join(_TEXT_KEYS)}")
        prompts = [row[key].strip() for row in rows if row[key].strip()]
    elif path.suffix in (".json", ".jsonl"):
        try:
            items = (
                json.loads(text)
                if path.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        for number, item in enumerate(items, start=1):
            prompts.append(_prompt_of(item, f"{path}: item {number}"))
    else:
        raise InputError(f"{path}: unknown format {path.suffix!r} (use .txt, .csv, .json, .jsonl)")
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def _prompt_of(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in _TEXT_KEYS:
            if isinstance(item.get(key), str):
                return str(item[key])
    raise InputError(f"{where}: expected a string or an object with one of {', '.join(_TEXT_KEYS)}")


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a hash of its text."""
    bucket = int(hashlib.sha256(prompt.strip().encode()).hexdigest(), 16) % 100
    for name, share in SPLITS.items():
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("SPLITS must add up to 100")


def take_split(prompts: Sequence[str], *names: str) -> list[str]:
    """The prompts that fall in any of the named splits, in their original order."""
    unknown = set(names) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; known: {list(SPLITS)}")
    return [p for p in prompts if split_of(p) in names]


def content_hash(prompts: Sequence[str]) -> str:
    """A short hash of a prompt set, recorded in the calibration manifest."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
