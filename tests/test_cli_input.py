"""`guardrail batch` rejects bad input with one clear line, before loading any model."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1, "prompt": "hi"}\n{"id": 2, "prompt": "x"\n', "in.jsonl:2: invalid JSON"),
        ('{"id": 1}\n', "in.jsonl:1: missing field 'prompt'"),
        ('{"prompt": "hi"}\n', "in.jsonl:1: missing field 'id'"),
        ('{"id": 1, "prompt": ""}\n', "in.jsonl:1: field 'prompt' must be"),
        ('{"id": 1, "prompt": [{"role": "user"}]}\n', "in.jsonl:1: field 'prompt' must be"),
        ("[1, 2]\n", "in.jsonl:1: expected a JSON object"),
        ("\n", "no requests"),
    ],
)
def test_bad_batch_input(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "in.jsonl").write_text(content)
    result = run_cli("batch", "in.jsonl", "--out", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "in.jsonl"]  # nothing half-written


def test_missing_input_file(tmp_path: Path) -> None:
    result = run_cli("batch", "absent.jsonl", "--out", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "absent.jsonl: no such file" in result.stderr


def test_unknown_model(tmp_path: Path) -> None:
    result = run_cli(
        "chat", "hello", "--unguarded", "--model", str(tmp_path / "no-such-model"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "cannot load model" in result.stderr and "no-such-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_recipe_is_named(tmp_path: Path) -> None:
    result = run_cli("calibrate", "--recipe", "strict", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'strict'" in result.stderr
