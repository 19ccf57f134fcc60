"""Prompt loading and hash-assigned splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guardrail.calibrate import datasets
from guardrail.errors import InputError


def test_shipped_sets_load() -> None:
    assert len(datasets.load_prompts(datasets.advbench())) == 520
    assert len(datasets.load_many(datasets.default_harmful())) == 1020
    assert len(datasets.load_many(datasets.default_harmless())) == 2998
    templates = datasets.load_prompts(datasets.default_templates())
    assert templates and all(t.count("{prompt}") == 1 for t in templates)


def test_held_out_wrapper_families_never_reach_calibration() -> None:
    assert len(datasets.load_prompts(datasets.borderline_benign())) == 487
    from guardrail.calibrate.gate import CalibrationConfig, config_templates

    families = datasets.load_families(datasets.wrapper_families())
    assert len(families) == 12 and set(datasets.HELD_OUT_FAMILIES) <= set(families)
    held_out = {t for f in datasets.HELD_OUT_FAMILIES for t in families[f]}
    config = CalibrationConfig(
        templates=[str(datasets.default_templates()), str(datasets.wrapper_families())]
    )
    used = set(config_templates(config))
    assert used and not used & held_out
    assert set(datasets.load_templates(datasets.wrapper_families(), held_out=True)) == held_out
    seen = {t for f, ts in families.items() if f not in datasets.HELD_OUT_FAMILIES for t in ts}
    assert seen <= used


def test_held_out_jailbreakchat_templates_never_reach_calibration() -> None:
    from guardrail.calibrate.gate import CalibrationConfig, config_templates

    path = datasets.jailbreakchat_templates()
    held_out = datasets.load_templates(path, held_out=True)
    seen = datasets.load_templates(path)
    assert (len(seen), len(held_out)) == (67, 10)
    used = set(config_templates(CalibrationConfig.jailbreak_augmented()))
    assert set(seen) <= used and not used & set(held_out)
    # the pooled probe sees them in the jailbreak recipe only (the token read: `extra_templates`)
    assert not set(config_templates(CalibrationConfig())) & set(seen)
    # the mark follows the template's own split: the held-out ones are those in `test`
    assert {datasets.split_of(t) for t in held_out} == {"test"}
    assert "test" not in {datasets.split_of(t) for t in seen}


def test_suffixes_are_stable_random_tokens_after_the_request(lm: Any) -> None:
    tokenizer = lm.tokenizer
    prompts = datasets.load_many(datasets.default_harmless())
    suffixed = datasets.with_suffixes(prompts, tokenizer, 0.15)
    assert suffixed == datasets.with_suffixes(prompts, tokenizer, 0.15)
    assert 0.12 < len(suffixed) / len(prompts) < 0.18
    by_prompt = {p: s for s in suffixed for p in prompts if s.startswith(p + " ")}
    assert len(by_prompt) == len(suffixed)
    tails = [s[len(p) :] for p, s in by_prompt.items()]
    assert len(set(tails)) == len(tails)  # a different suffix for every prompt
    assert all(8 <= len(tokenizer(t.strip())["input_ids"]) <= 40 for t in tails)  # re-tokenised


def test_a_share_of_suffixes_is_words_and_punctuation(lm: Any) -> None:
    """With `words`, the same prompts get suffixes, the share it names made of whole words and
    punctuation marks; the others keep the random tokens they had without it."""
    tokenizer = lm.tokenizer
    prompts = datasets.load_many(datasets.default_harmless())
    random_only = datasets.with_suffixes(prompts, tokenizer, 0.15)
    mixed = datasets.with_suffixes(prompts, tokenizer, 0.15, words=0.5)
    assert mixed == datasets.with_suffixes(prompts, tokenizer, 0.15, words=0.5)
    assert len(mixed) == len(random_only)
    changed = [(a, b) for a, b in zip(random_only, mixed, strict=True) if a != b]
    assert 0.4 < len(changed) / len(mixed) < 0.6
    tails = []
    for before, after in changed:
        prompt = next(p for p in prompts if before.startswith(p + " "))
        tails.append(after.removeprefix(prompt + " "))
        assert tails[-1] != after and tails[-1].isascii()
        assert len(tokenizer(tails[-1])["input_ids"]) >= 8
    marked = [t for t in tails if any(not c.isalnum() and not c.isspace() for c in t)]
    assert len(marked) / len(tails) > 0.8  # about 3 tokens in 10 are punctuation marks


def test_jailbreak_recipe_adds_public_sets_to_the_defaults() -> None:
    harmful = datasets.load_many(datasets.jailbreak_harmful())
    harmless = datasets.load_many(datasets.jailbreak_harmless())
    assert set(datasets.load_many(datasets.default_harmful())) < set(harmful)
    assert set(datasets.load_many(datasets.default_harmless())) < set(harmless)
    assert (len(harmful), len(harmless)) == (2515, 5386)
    assert not set(harmful) & set(harmless)


def test_new_settings_at_their_old_value_keep_existing_keys(lm: Any) -> None:
    """Calibrations made before `suffix_share`, `suffix_words` and `context_copies` existed
    keep their keys (`--recipe pooled` is one: its key is the one it was shipped under until
    2026-12-07); changing any makes a new one, and so does dropping the token read."""
    from guardrail.calibrate.gate import CalibrationConfig
    from guardrail.calibrate.store import artifact_key

    assert artifact_key(lm, CalibrationConfig.pooled_only()).endswith("-f39b2fc7ac06494c-v3")
    random_tokens = CalibrationConfig(suffix_share=0.15, suffix_words=0.0)
    assert artifact_key(lm, random_tokens).endswith("-c8b47158770cf35a-v3")  # random tokens only
    key = artifact_key(lm, CalibrationConfig(suffix_share=0.0, suffix_words=0.0))
    assert key.endswith("-c0947182411f551f-v3")  # the default until suffixes were on
    assert key != artifact_key(lm, CalibrationConfig())
    for change in ({"context_copies": False}, {"token_layers": ()}):
        assert key != artifact_key(
            lm, CalibrationConfig(suffix_share=0.0, suffix_words=0.0, **change)
        )


def test_held_out_contexts_never_reach_calibration() -> None:
    from guardrail.calibrate.gate import CalibrationConfig, config_contexts

    used = config_contexts(CalibrationConfig())
    held_out = datasets.load_contexts(datasets.contexts(), held_out=True)
    assert len(used) >= 60 and len(held_out) >= 15
    assert not {repr(c) for c in used} & {repr(c) for c in held_out}
    for contexts in (used, held_out):  # every kind of context on both sides
        assert any("<tools>" in c[0]["content"] for c in contexts)
        assert any(c[-1]["role"] == "assistant" for c in contexts)
        assert sum(len(c) == 1 and "<tools>" not in c[0]["content"] for c in contexts) >= 5
    chats = datasets.in_contexts(["Tell me a joke."] * 3, held_out, 1.0)
    assert chats[0] == chats[1] and chats[0][-1] == {"role": "user", "content": "Tell me a joke."}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", r"c\.jsonl: line 1: not JSON"),
        ('{"family": "x"}\n', r"c\.jsonl: line 1: expected an object with `messages`"),
        ('\n{"messages": [{"role": "system"}]}\n', r"c\.jsonl: line 2: each message needs"),
        ('{"tools": {"name": "f"}}\n', r"line 1: expected an object"),
    ],
)
def test_bad_context_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "c.jsonl"
    bad.write_text(content)
    with pytest.raises(InputError, match=message):
        datasets.load_contexts(bad)


def test_bad_template_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "w.jsonl"
    bad.write_text('{"family": "x", "template": "no slot"}\n')
    with pytest.raises(InputError, match=r"w.jsonl.*slot"):
        datasets.load_templates(bad, held_out=False)
    bad.write_text('{"family": "x"}\n')
    with pytest.raises(InputError, match=r"w\.jsonl: line 1"):
        datasets.load_templates(bad)
    bad.write_text('{"family": "x", "template": "{prompt}", "held_out": "yes"}\n')
    with pytest.raises(InputError, match=r"w\.jsonl: line 1: held_out must be true or false"):
        datasets.load_templates(bad)


def test_wrap_is_stable_and_keeps_the_request() -> None:
    prompts = datasets.load_many(datasets.default_harmless())
    templates = datasets.load_prompts(datasets.default_templates())
    wrapped = datasets.wrap(prompts, templates, 0.3)
    assert wrapped == datasets.wrap(prompts, templates, 0.3)
    assert 0.25 < len(wrapped) / len(prompts) < 0.35
    assert all("{prompt}" not in w for w in wrapped)


def test_split_is_stable_and_disjoint() -> None:
    prompts = datasets.load_prompts(datasets.advbench())
    parts = {name: set(datasets.take_split(prompts, name)) for name in datasets.SPLITS}
    assert sum(map(len, parts.values())) == len(set(prompts))
    assert not parts["test"] & (parts["fit"] | parts["select"] | parts["dev"])
    # order does not matter: a prompt's split comes from its text alone
    assert set(datasets.take_split(list(reversed(prompts)), "test")) == parts["test"]
    for name, share in datasets.SPLITS.items():
        assert abs(len(parts[name]) / len(prompts) - share / 100) < 0.06


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", "[1, 2", "invalid JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"nope": 1}\n', "item 2"),
        ("bad.csv", "a,b\n1,2\n", "no column"),
        ("empty.txt", "\n\n", "no prompts"),
        ("bad.xml", "<a/>", "unknown format"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        datasets.load_prompts(path)
    assert name in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(InputError, match="no such file"):
        datasets.load_prompts("/nonexistent/prompts.txt")
