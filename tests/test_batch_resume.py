"""`guardrail batch` survives interruption: finished rows are kept and never answered twice.

The end-to-end test runs the real `run([...])` path on the embedded model, interrupted by a
real SIGINT (what Ctrl-C sends) after a few rows; the rest check the partial file's rules
without loading a model.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from guardrail.cli import read_partial, read_requests, run
from guardrail.errors import InputError

PROMPTS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is two plus two?",
]
ROWS = [{"id": i if i % 2 else f"r{i}", "prompt": p, "extra": [i]} for i, p in enumerate(PROMPTS)]
OPTIONS = ["--unguarded", "--max-new-tokens", "8", "--batch-size", "2"]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answered(rows: list[dict[str, Any]]) -> list[str]:
    return [json.dumps({**r, "response": "x", "guard": {"fired": False}}) + "\n" for r in rows]


def _without_timings(path: Path) -> list[dict[str, Any]]:
    """The output rows minus `guard.timings_ms`, the one field that differs between runs."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        del row["guard"]["timings_ms"]
    return rows


class _Counting:
    """Records every prompt the guard is asked to answer; sends SIGINT after `stop_after`
    answers (counted from the last `start()`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from guardrail.serve.guard import Guard

        self.start()
        original = Guard.generate

        async def generate(guard: Guard, messages: Any, *args: Any, **kwargs: Any) -> Any:
            self.submitted.append(messages)
            answer = await original(guard, messages, *args, **kwargs)
            self.finished += 1
            if self.finished == self.stop_after:
                signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, mid-run
            return answer

        monkeypatch.setattr(Guard, "generate", generate)

    def start(self, stop_after: int | None = None) -> None:
        self.submitted: list[Any] = []
        self.finished = 0
        self.stop_after = stop_after


@pytest.mark.slow
def test_interrupted_run_resumed_equals_uninterrupted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    # Ctrl-C reaches a foreground process; a job started with `&` inherits SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    source = _write(tmp_path / "in.jsonl", ROWS)
    counting = _Counting(monkeypatch)

    whole = tmp_path / "whole.jsonl"
    assert run(["batch", str(source), "--out", str(whole), *OPTIONS, "--quiet"]) == 0
    assert sorted(counting.submitted) == sorted(PROMPTS)
    assert not (tmp_path / "whole.jsonl.partial").exists()

    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    counting.start(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(["batch", str(source), "--out", str(out), *OPTIONS, "--quiet"])
    assert not out.exists(), "the final file appears only when every row is done"
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 2 <= len(kept) < len(ROWS)
    assert f"interrupted: {len(kept)} of {len(ROWS)} rows kept" in capsys.readouterr().err
    with partial.open("a") as handle:  # a crash mid-write tears the last line
        handle.write('{"id": 1, "prompt": "What is the ca')

    counting.start()
    with pytest.raises(InputError, match="--resume"):  # never overwrite finished work
        run(["batch", str(source), "--out", str(out), *OPTIONS, "--quiet"])

    counting.start()
    assert run(["batch", str(source), "--out", str(out), *OPTIONS, "--resume"]) == 0
    done = {row["prompt"] for row in kept}
    assert sorted(counting.submitted) == sorted(set(PROMPTS) - done), "a finished row re-ran"
    err = capsys.readouterr().err
    assert f"resuming: {len(kept)} of {len(ROWS)} rows" in err
    assert f"{len(ROWS)}/{len(ROWS)}" in err  # the progress bar counts the kept rows too
    assert not partial.exists()
    # Greedy: the same answers; only the wall-clock timings differ between any two runs.
    assert _without_timings(out) == _without_timings(whole)
    assert [r["id"] for r in _without_timings(out)] == [r["id"] for r in ROWS]


def test_finished_partial_file_needs_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row already in the partial file: the final file is written, nothing loaded."""
    import guardrail.cli

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no row was left to answer")

    monkeypatch.setattr(guardrail.cli, "_guard", no_model)
    source = _write(tmp_path / "in.jsonl", ROWS)
    lines = _answered(ROWS)
    (tmp_path / "out.jsonl.partial").write_text("".join(reversed(lines)))  # completion order
    assert run(["batch", str(source), "--out", str(tmp_path / "out.jsonl"), "--resume"]) == 0
    assert (tmp_path / "out.jsonl").read_text() == "".join(lines)  # input order, same bytes
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_partial_file_without_resume_is_an_error(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.jsonl", ROWS)
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text(_answered(ROWS)[0])
    with pytest.raises(InputError, match=r"out.jsonl.partial: .*--resume.*delete"):
        run(["batch", str(source), "--out", str(tmp_path / "out.jsonl")])
    assert partial.read_text() == _answered(ROWS)[0]


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    first, second = _answered(ROWS[:2])
    partial = tmp_path / "p.partial"
    partial.write_text(first + second[:-5])
    done, size = read_partial(partial, ROWS)
    assert list(done.values()) == [first] and size == len(first.encode())


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (lambda a: [a[0], a[0]], r"p.partial:2: field 'id': \"r0\" is answered twice"),
        (lambda a: [a[1], '{"id": 7, "response": "x"}\n'], r"p.partial:2: field 'id': 7 is not in"),
        (lambda a: ["{not json\n", a[0]], r"p.partial:1: invalid JSON"),
        (lambda a: ['{"response": "x"}\n'], r"p.partial:1: missing field 'id'"),
        (
            lambda a: [a[0].replace("What is the capital", "What is")],
            r"p.partial:1: field 'prompt' differs from the input's row \"r0\"",
        ),
    ],
)
def test_bad_partial_file(tmp_path: Path, lines: Any, message: str) -> None:
    partial = tmp_path / "p.partial"
    partial.write_text("".join(lines(_answered(ROWS))))
    with pytest.raises(InputError, match=message):
        read_partial(partial, ROWS)


def test_duplicate_input_id(tmp_path: Path) -> None:
    source = _write(tmp_path / "in.jsonl", [ROWS[0], ROWS[1], {"id": "r0", "prompt": "again"}])
    with pytest.raises(
        InputError, match=r"in.jsonl:3: field 'id': \"r0\" is also the id on line 1"
    ):
        read_requests(source)
    _write(
        source, [{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}, {"id": True, "prompt": "c"}]
    )
    assert len(read_requests(source)) == 3  # 1, "1" and true are different ids
