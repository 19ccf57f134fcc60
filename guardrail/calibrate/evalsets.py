"""Evaluation sets: prompt files in common public formats, each prompt labelled harmful or benign.

A set is a CSV, JSONL or JSON-array file. The prompt comes from the first field the file's
format names (AdvBench `goal`, HarmBench `Behavior` after its `ContextString`, JailbreakBench
`Goal`, XSTest `prompt`, Alpaca `instruction` plus `input`, else the first of `prompt`, `goal`,
`behavior`, `instruction`, `question`, `query`, `request`, `text`; field names match in any
case). A row's label comes from its `label` field (harmful/unsafe or benign/safe/harmless),
else for XSTest from its `type` (`contrast_*` prompts are the unsafe ones), else from the
set's own label (`FILE:harmful`), else from its format where that is known (AdvBench and
HarmBench hold only harmful behaviours), else from the run's `--label` (so one `--label`
can name the label of the unlabelled sets beside an AdvBench set). `take` keeps the prompts
in one hash split (`datasets.split_of`, so `test` is never seen by calibration) and the first
`limit` of them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardrail.calibrate.datasets import SPLITS, jsonl_lines, split_of
from guardrail.errors import InputError

LABELS = ("harmful", "benign")
_LABEL_WORDS = {
    "harmful": "harmful",
    "unsafe": "harmful",
    "benign": "benign",
    "safe": "benign",
    "harmless": "benign",
}
PROMPT_FIELDS = (
    "prompt",
    "goal",
    "behavior",
    "instruction",
    "question",
    "query",
    "request",
    "text",
)
# A row's id, where the file has one (HarmBench's BehaviorID, XSTest's id_v2, JailbreakBench's
# Index); else its number in the file.
ID_FIELDS = ("id", "behaviorid", "id_v2", "id_v1", "index")
# Formats whose every prompt is harmful, so a set in them needs no label.
HARMFUL_FORMATS = ("advbench", "harmbench")


@dataclass
class EvalRow:
    id: Any  # the file's id (`ID_FIELDS`), else the row's number in the file (1-based)
    prompt: str | list[dict[str, str]]
    label: str  # "harmful" | "benign"
    where: str  # "FILE:LINE" (or "FILE: item N" in a JSON array), for errors


@dataclass
class EvalSet:
    name: str  # the file stem, made unique among the run's sets
    path: Path
    format: str  # advbench | harmbench | jailbreakbench | xstest | alpaca | generic
    rows: list[EvalRow] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """The labels its rows carry, in `LABELS` order."""
        present = {row.label for row in self.rows}
        return [label for label in LABELS if label in present]


def label_word(value: str) -> str | None:
    """`harmful` or `benign` for a label word (harmful, unsafe; benign, safe, harmless)."""
    return _LABEL_WORDS.get(value.strip().lower())


def parse_set_argument(text: str) -> tuple[Path, str | None]:
    """`FILE` or `FILE:LABEL` (a label word after the last colon, when FILE is not itself a file
    with that name)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and label_word(tail) is not None and not Path(text).exists():
        return Path(head), label_word(tail)
    return Path(text), None


def prompt_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """The text a prompt is split by: the string, or a chat's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def read_sets(
    arguments: Sequence[str],
    *,
    label: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[EvalSet]:
    """Read, label and cut every set; errors name the file, line and field, before any model
    loads. Set names are the file stems, with `_2`, `_3`, ... where two would be the same."""
    if label is not None and label_word(label) is None:
        raise InputError(f"--label must be harmful or benign, got {label!r}")
    if split is not None and split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    sets: list[EvalSet] = []
    taken: set[str] = set()
    for argument in arguments:
        path, own_label = parse_set_argument(argument)
        name, n = path.stem, 1
        while name in taken:
            n += 1
            name = f"{path.stem}_{n}"
        taken.add(name)
        loaded = load_set(
            path, name=name, label=own_label, fallback=label_word(label) if label else None
        )
        loaded.rows = take(loaded, split=split, limit=limit)
        sets.append(loaded)
    return sets


def take(loaded: EvalSet, *, split: str | None, limit: int | None) -> list[EvalRow]:
    """The set's rows in the named split (all without one), the first `limit` of them."""
    rows = [r for r in loaded.rows if split is None or split_of(prompt_text(r.prompt)) == split]
    if not rows:
        raise InputError(f"{loaded.path}: no prompts in the {split!r} split")
    return rows[:limit] if limit is not None else rows


def load_set(
    path: Path, *, name: str | None = None, label: str | None = None, fallback: str | None = None
) -> EvalSet:
    """One set, every row labelled: by its `label` field, else `label` (the set's own, from
    `FILE:LABEL`), else its format's, else `fallback` (`--label`)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    items = list(_items(path))
    if not items:
        raise InputError(f"{path}: no prompts")
    fmt = detect_format(items[0][1])
    default = label or ("harmful" if fmt in HARMFUL_FORMATS else None) or fallback
    loaded = EvalSet(name=name or path.stem, path=path, format=fmt)
    lines_of: dict[str, str] = {}
    for number, (where, item) in enumerate(items, start=1):
        prompt = _prompt(item, fmt, where)
        row_label = _row_label(item, fmt, where) or default
        if row_label is None:
            raise InputError(
                f"{path}: no label for its prompts (no 'label' field, and not a set known to be "
                "all harmful); pass --label harmful|benign, or FILE:harmful / FILE:benign"
            )
        fields = _fields(item)
        id_field = next((fields[k] for k in ID_FIELDS if k in fields), None)
        row_id = item[id_field] if isinstance(item, dict) and id_field else number
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool) or row_id == "":
            raise InputError(f"{where}: field {id_field!r} must be a string or an integer")
        key = json.dumps(row_id)
        if key in lines_of:
            raise InputError(f"{where}: field 'id': {key} is also the id at {lines_of[key]}")
        lines_of[key] = where
        loaded.rows.append(EvalRow(id=row_id, prompt=prompt, label=row_label, where=where))
    return loaded


def detect_format(item: dict[str, Any] | str) -> str:
    """The public format a row's field names match (in any case)."""
    if isinstance(item, str):
        return "generic"
    keys = set(_fields(item))
    if {"goal", "target"} <= keys and "behavior" not in keys:
        return "advbench"
    if {"goal", "behavior"} <= keys:
        return "jailbreakbench"  # harmful and benign behaviours share its columns
    if "behavior" in keys and keys & {"functionalcategory", "semanticcategory", "behaviorid"}:
        return "harmbench"
    if {"prompt", "type"} <= keys and keys & {"focus", "note", "label"}:
        return "xstest"
    if "instruction" in keys and keys & {"input", "output"}:
        return "alpaca"
    return "generic"


def _fields(item: dict[str, Any] | str) -> dict[str, str]:
    """Lower-cased field name -> the name as written (the first, if two differ only in case)."""
    if isinstance(item, str):
        return {}
    found: dict[str, str] = {}
    for key in item:
        found.setdefault(str(key).strip().lower(), key)
    return found


def _items(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(where, row) for each row of a .csv, .jsonl or .json (an array) file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            start = reader.line_num + 1
            try:
                for row in reader:
                    yield f"{path}:{start}", {k: v for k, v in row.items() if k is not None}
                    start = reader.line_num + 1
            except csv.Error as exc:
                raise InputError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from exc
    elif suffix == ".jsonl":
        for number, item in jsonl_lines(path):
            if not isinstance(item, (dict, str)):
                raise InputError(f"{path}:{number}: expected a JSON object or string")
            yield f"{path}:{number}", item
    elif suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(items, list):
            raise InputError(f"{path}: expected a JSON array of prompts")
        for number, item in enumerate(items, start=1):
            if not isinstance(item, (dict, str)):
                raise InputError(f"{path}: item {number}: expected a JSON object or string")
            yield f"{path}: item {number}", item
    else:
        raise InputError(f"{path}: unknown format {path.suffix!r} (use .csv, .jsonl or .json)")


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field {key!r} must be a string, not {type(value).__name__}")
    return value.strip()


def _prompt(item: dict[str, Any] | str, fmt: str, where: str) -> str | list[dict[str, str]]:
    if isinstance(item, str):
        if not item.strip():
            raise InputError(f"{where}: empty prompt")
        return item.strip()
    fields = _fields(item)
    order = {
        "advbench": ("goal",),
        "jailbreakbench": ("goal",),
        "harmbench": ("behavior",),
        "xstest": ("prompt",),
        "alpaca": ("instruction",),
    }.get(fmt, PROMPT_FIELDS)
    key = next((fields[k] for k in order if k in fields), None)
    if key is None:
        raise InputError(f"{where}: no prompt field (one of {', '.join(order)})")
    value = item[key]
    if isinstance(value, list):  # a chat, as in `batch` input
        if value and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        ):
            return [{"role": m["role"], "content": m["content"]} for m in value]
        raise InputError(f"{where}: field {key!r} must be a string or a list of {{role, content}}")
    text = _text(item, key, where)
    if not text:
        raise InputError(f"{where}: field {key!r} is empty")
    extra = {"harmbench": ("contextstring", True), "alpaca": ("input", False)}.get(fmt)
    if extra and extra[0] in fields:
        more = _text(item, fields[extra[0]], where)
        if more:  # HarmBench puts the context first; Alpaca the input after the instruction
            text = f"{more}\n\n---\n\n{text}" if extra[1] else f"{text}\n\n{more}"
    return text


def _row_label(item: dict[str, Any] | str, fmt: str, where: str) -> str | None:
    fields = _fields(item)
    if isinstance(item, str):
        return None
    if "label" in fields and item[fields["label"]] not in (None, ""):
        value = item[fields["label"]]
        word = label_word(value) if isinstance(value, str) else None
        if word is None:
            raise InputError(
                f"{where}: field {fields['label']!r}: {value!r} is not a label "
                "(harmful, unsafe, benign, safe or harmless)"
            )
        return word
    if fmt == "xstest" and "type" in fields:
        kind = _text(item, fields["type"], where)
        return "harmful" if kind.startswith("contrast_") else "benign"
    return None


__all__ = [
    "HARMFUL_FORMATS",
    "LABELS",
    "PROMPT_FIELDS",
    "EvalRow",
    "EvalSet",
    "detect_format",
    "label_word",
    "load_set",
    "parse_set_argument",
    "prompt_text",
    "read_sets",
    "take",
]
