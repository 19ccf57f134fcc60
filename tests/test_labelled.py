"""Human-labelled answers: splits kept apart, the shipped sample, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import shared_file
from guardrail.calibrate import labelled
from guardrail.errors import InputError


def test_splits_never_share_what_they_are_split_by() -> None:
    """GPTFuzz and CoCoNot split by prompt (question), moderation by text."""
    shared_file("diasafety", "test.json")
    keys = {"gptfuzz": "prompt", "coconot_pref": "prompt", "moderation": "response"}
    for name, key in keys.items():
        seen = {s: {getattr(i, key) for i in labelled.load(name, s)} for s in labelled.SPLITS}
        assert seen["test"] and seen["fit"] and seen["select"], name
        assert not seen["test"] & (seen["fit"] | seen["select"]), name
        assert not seen["fit"] & seen["select"], name


def test_hh_rlhf_pairs_hold_one_safe_and_one_unsafe_answer() -> None:
    shared_file("hh_rlhf_harmless_base_test", "harmless-base", "test.jsonl.gz")
    items = labelled.load("hh_rlhf", "test")
    pairs: dict[int | None, list[bool]] = {}
    for item in items:
        pairs.setdefault(item.pair, []).append(item.unsafe)
    assert pairs and all(sorted(v) == [False, True] for v in pairs.values())


def test_the_shipped_sample_holds_no_test_answer() -> None:
    shared_file("gptfuzz_labeled_responses", "responses_labeled", "evaluate.csv")
    shipped = {
        (i.set, i.prompt, i.response) for s in ("fit", "select") for i in labelled.shipped(s)
    }
    assert len(shipped) > 1000
    test = {
        (i.set, i.prompt, i.response[: labelled.MAX_CHARS])
        for name in labelled.TRAIN_SETS
        for i in labelled.load(name, "test")
    }
    assert not shipped & test
    assert labelled.shipped("test") == []


def test_bad_names_and_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown labelled set 'nope'"):
        labelled.load("nope", "fit")
    with pytest.raises(InputError, match="unknown split 'dev'"):
        labelled.load("gptfuzz", "dev")
    with pytest.raises(InputError, match="not found"):
        labelled.load("gptfuzz", "fit", root=tmp_path / "missing")
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"set": "x", "split": "fit"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"answers\.jsonl:1: 'prompt'"):
        labelled.shipped("fit", bad)
