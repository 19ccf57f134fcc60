"""The worker's scheduler with a fake executor: no model, no tensors, no threads.

`FakeExecutor` plays the worker's loop around the scheduler: each row's answer is scripted
(its length, the token whose chunk goes over budget, how many passes its search takes), and
every loop turn is one decode step for the batch plus one pass of each search.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from guardrail.errors import OverloadedError
from guardrail.serve.scheduler import Entry, Scheduler


@dataclass
class Ticket:
    cancelled: bool = False


@dataclass
class Script:
    name: str
    length: int = 100  # answer tokens before end of turn
    over_at: int | None = None  # a check covering this token fails: the row searches
    search_passes: int = 3
    refused: bool = False  # answered at admission (the gate refused it)
    steps: list[int] = field(default_factory=list)  # loop turns in which the row decoded
    searched_in: list[int] = field(default_factory=list)  # turns in which its search ran
    outcome: str = ""


def entry(name: str, tenant: str = "a", *, deadline: float | None = None, **script: int) -> Entry:
    return Entry(
        tenant=tenant,
        submitted=0.0,
        max_new_tokens=script.pop("max_new_tokens", 1000),
        ticket=Ticket(),
        deadline=deadline,
        job=Script(name, **script),  # type: ignore[arg-type]
    )


class FakeExecutor:
    """The worker's loop, with scripted answers instead of a model."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.turn = 0
        self.admitted: list[list[str]] = []  # names admitted per turn
        self.batch: list[Entry] = []  # the "KV cache" rows, in order

    def run_turn(self, now: float = 0.0) -> None:
        self.turn += 1
        plan = self.s.plan(now)
        for e, why in plan.leave:
            e.job.outcome = why
        if plan.admit:
            self.admitted.append([e.job.name for e in plan.admit])
            decoding = [e for e in plan.admit if not e.job.refused]
            for e in plan.admit:
                if e.job.refused:
                    e.job.outcome = "refused"
            self.s.joined(decoding)
        rows = list(self.s.running)
        assert [e for e in rows] == [e for e in self.batch if e in rows] + [
            e for e in rows if e not in self.batch
        ], "joined rows are appended after the batch's rows"
        for e in rows:
            e.job.steps.append(self.turn)
            if self.s.ends_now(e, eos=e.tokens >= e.job.length):
                self._check(e, e.tokens, final=True)
                continue
            verdict = self.s.after_token(e, stopped=False)
            if verdict == "final":
                self._check(e, e.tokens, final=True)
            elif verdict == "check":
                self._check(e, e.tokens - 1, final=False)
        keep = self.s.kept(rows)
        self.batch = [rows[i] for i in keep]
        for e in list(self.s.searching):
            e.job.searched_in.append(self.turn)
            if len(e.job.searched_in) >= e.job.search_passes:
                e.job.outcome = "searched"
                self.s.finish(e)

    def _check(self, e: Entry, end: int, *, final: bool) -> None:
        over = e.job.over_at
        if over is not None and e.released < over <= end and not e.job.searched_in:
            self.s.to_search(e)
            return
        self.s.checked(e, end)
        if final:
            e.job.outcome = "done"
            self.s.finish(e)

    def run(self, turns: int) -> None:
        for _ in range(turns):
            self.run_turn()


def test_admission_is_fifo_within_a_tenant_and_bounded_by_the_batch() -> None:
    s = Scheduler(max_batch=3, chunk_tokens=4)
    names = [f"r{i}" for i in range(5)]
    for name in names:
        s.add(entry(name, length=2))
    fake = FakeExecutor(s)
    fake.run_turn()
    assert fake.admitted == [["r0", "r1", "r2"]] and s.queued == 2
    assert len(s.running) == 3
    fake.run(5)
    assert [a for turn in fake.admitted for a in turn] == names
    assert s.idle and s.queued == 0


def test_tenants_share_admission_round_robin() -> None:
    """A burst of one tenant does not starve another tenant's later requests."""
    s = Scheduler(max_batch=4)
    for i in range(10):
        s.add(entry(f"a{i}", "a"))
    s.add(entry("b0", "b"))
    s.add(entry("b1", "b"))
    s.add(entry("c0", "c"))
    plan = s.plan(0.0)
    assert [e.job.name for e in plan.admit] == ["a0", "b0", "c0", "a1"]
    s.joined(plan.admit)
    for e in list(s.running)[:2]:
        s.finish(e)
    assert [e.job.name for e in s.plan(0.0).admit] == ["b1", "a2"]


def test_arrivals_join_a_running_batch_in_groups() -> None:
    """One prefill per group: an arrival waits for `join_group` others or `join_turns` loop
    turns; with fewer free slots than a group, it joins at once."""
    s = Scheduler(max_batch=6, join_group=3, join_turns=2)
    s.add(entry("first"))
    s.joined(s.plan(0.0).admit)  # nothing running: admitted at once
    s.add(entry("a"))
    assert s.plan(0.0).admit == [] and s.plan(0.0).admit == []
    joined = s.plan(0.0).admit  # waited its turns
    assert [e.job.name for e in joined] == ["a"]
    s.joined(joined)
    s.add(entry("b"))
    s.add(entry("c"))
    assert s.plan(0.0).admit == []
    s.add(entry("d"))
    joined = s.plan(0.0).admit
    assert [e.job.name for e in joined] == ["b", "c", "d"]
    s.joined(joined)
    s.add(entry("e"))
    assert [e.job.name for e in s.plan(0.0).admit] == ["e"]  # the one slot left
    # By default a group is a quarter of the rows running: light load joins at once.
    light = Scheduler(max_batch=16)
    light.add(entry("one"))
    light.joined(light.plan(0.0).admit)
    light.add(entry("two"))
    assert [e.job.name for e in light.plan(0.0).admit] == ["two"]
    busy = Scheduler(max_batch=16)
    for i in range(8):
        busy.add(entry(f"r{i}"))
    busy.joined(busy.plan(0.0).admit)
    busy.add(entry("late"))
    assert busy.plan(0.0).admit == []  # 8 running: groups of 2
    busy.add(entry("later"))
    assert [e.job.name for e in busy.plan(0.0).admit] == ["late", "later"]


def test_a_search_never_stalls_the_other_rows() -> None:
    """While one row runs its search passes, the plain rows step in every loop turn."""
    s = Scheduler(max_batch=4, chunk_tokens=4)
    rows = [entry("plain0", length=30), entry("over", over_at=6, search_passes=5)]
    rows.append(entry("plain1", length=30))
    for e in rows:
        s.add(e)
    fake = FakeExecutor(s)
    fake.run(20)
    over = rows[1].job
    assert over.outcome == "searched" and len(over.searched_in) == 5
    for plain in (rows[0].job, rows[2].job):
        assert set(over.searched_in) <= set(plain.steps)  # stepped in every search turn
    assert rows[1].released == 4  # the chunk before the one over budget
    assert over.steps[-1] == over.searched_in[0]  # left the batch in the turn it searched
    assert len(s.running) == 2 and s.searching == []


def test_checks_fall_every_chunk_and_the_limit_is_final() -> None:
    s = Scheduler(chunk_tokens=4)
    e = entry("r", max_new_tokens=10)
    s.add(e)
    s.joined(s.plan(0.0).admit)
    verdicts = [s.after_token(e, stopped=False) for _ in range(10)]
    # The check after token 5 covers tokens 1-4 (the newest waits), and so on.
    assert [i + 1 for i, v in enumerate(verdicts) if v == "check"] == [5, 6, 7, 8, 9]
    s.checked(e, 4)
    assert e.released == 4
    assert verdicts[-1] == "final"
    e2 = entry("r2", max_new_tokens=10)
    e2.released = 0
    s2 = Scheduler(chunk_tokens=4)
    seen = []
    for _ in range(9):
        v = s2.after_token(e2, stopped=False)
        seen.append(v)
        if v == "check":
            s2.checked(e2, e2.tokens - 1)
    assert [i + 1 for i, v in enumerate(seen) if v == "check"] == [5, 9]
    assert s2.after_token(e2, stopped=False) == "final"


def test_a_check_in_flight_moves_the_next_check_a_chunk_on() -> None:
    """While a check runs beside the decode the row keeps decoding; its next check falls a
    chunk after the text in flight, and a search or a passed check clears it."""
    s = Scheduler(chunk_tokens=4)
    e = entry("r", max_new_tokens=100)
    verdicts = [s.after_token(e, stopped=False) for _ in range(5)]
    assert verdicts[-1] == "check"
    s.check_sent(e, 4)
    assert e.released == 0 and e.checking == 4
    seen = [s.after_token(e, stopped=False) for _ in range(4)]  # tokens 6-9
    assert seen == ["keep", "keep", "keep", "check"]  # token 9: tokens 5-8 are a chunk
    s.checked(e, 4)
    assert (e.released, e.checking) == (4, None)
    s.check_sent(e, 8)
    s.checked(e, 4)  # an older outcome does not clear a newer check in flight
    assert e.checking == 8
    s.add(e)
    s.joined(s.plan(0.0).admit)
    s.to_search(e)
    assert e.checking is None and e.phase == "searching"


def test_stop_and_state_reads_at_the_limit() -> None:
    s = Scheduler(chunk_tokens=16)
    e = entry("r", max_new_tokens=3)
    assert s.after_token(e, stopped=True) == "final"
    reader = entry("latent", max_new_tokens=2)
    reader.reads_last = True
    assert s.after_token(reader, stopped=False) == "keep"
    assert s.after_token(reader, stopped=False) == "keep"  # at its limit: one more step
    assert reader.reading_last and s.ends_now(reader, eos=False)


def test_deadlines_fail_rows_wherever_they_are() -> None:
    s = Scheduler(max_batch=1, chunk_tokens=4)
    running = entry("running", deadline=5.0)
    waiting = entry("waiting", deadline=3.0)
    searching = entry("searching", deadline=8.0, over_at=2, search_passes=100)
    for e in (running, waiting):
        s.add(e)
    fake = FakeExecutor(s)
    fake.run_turn(now=0.0)
    assert s.running == [running] and s.queued == 1
    fake.run_turn(now=3.0)
    assert waiting.job.outcome == "timeout" and s.queued == 0
    fake.run_turn(now=5.0)
    assert running.job.outcome == "timeout" and s.running == []
    s.add(searching)
    for t in range(6):
        fake.run_turn(now=6.0 + t * 0.1)
    assert s.searching == [searching]
    fake.run_turn(now=8.0)
    assert searching.job.outcome == "timeout" and s.idle


def test_cancellation_leaves_at_the_next_turn() -> None:
    s = Scheduler(max_batch=4, chunk_tokens=4)
    rows = [entry(f"r{i}") for i in range(3)]
    queued = entry("queued")
    for e in rows:
        s.add(e)
    fake = FakeExecutor(s)
    fake.run(2)
    s.add(queued)
    queued.ticket.cancelled = True  # type: ignore[misc]
    rows[1].ticket.cancelled = True  # type: ignore[misc]
    steps_before = len(rows[1].job.steps)
    fake.run_turn()
    assert rows[1].job.outcome == "cancelled" and queued.job.outcome == "cancelled"
    assert len(rows[1].job.steps) == steps_before  # it did not decode again
    assert s.running == [rows[0], rows[2]] and fake.batch == [rows[0], rows[2]]
    assert s.queued == 0


def test_backpressure_refuses_past_the_queue_limit() -> None:
    s = Scheduler(max_batch=2, max_queue=2)
    s.add(entry("r0"))
    s.add(entry("r1"))
    with pytest.raises(OverloadedError, match="overloaded"):
        s.add(entry("r2"))
    s.joined(s.plan(0.0).admit)
    s.add(entry("r2"))  # admission made room
    assert s.queued == 1


def test_joining_adds_to_the_running_batch_only_when_on() -> None:
    for join in (True, False):
        s = Scheduler(max_batch=4, chunk_tokens=4, join=join)
        first = entry("first", length=5)
        s.add(first)
        fake = FakeExecutor(s)
        fake.run_turn()
        late = entry("late", length=5)
        s.add(late)
        fake.run_turn()
        if join:
            assert fake.admitted == [["first"], ["late"]] and s.running == [first, late]
        else:
            assert fake.admitted == [["first"]] and s.running == [first]
            fake.run(6)  # the batch empties, then the late request runs
            assert fake.admitted == [["first"], ["late"]]


def test_refused_rows_never_join_the_batch() -> None:
    s = Scheduler(max_batch=4)
    refused, plain = entry("refused", refused=True), entry("plain")
    s.add(refused)
    s.add(plain)
    fake = FakeExecutor(s)
    fake.run_turn()
    assert refused.job.outcome == "refused" and refused.job.steps == []
    assert s.running == [plain]


def test_an_idle_scheduler_waits_briefly_for_a_batch_to_fill() -> None:
    s = Scheduler(max_batch=3, max_wait=0.01)
    s.add(entry("r0"))
    plan = s.plan(100.0)
    assert plan.admit == [] and plan.wait == pytest.approx(0.01)
    s.add(entry("r1"))
    assert s.plan(100.005).wait == pytest.approx(0.005)
    assert [e.job.name for e in s.plan(100.011).admit] == ["r0", "r1"]
    for i in range(3):
        s.add(entry(f"full{i}", "b"))
    assert s.idle  # (the two admitted were answered at admission)
    assert len(s.plan(200.0).admit) == 3  # a full batch does not wait


def test_shutdown_drains_and_clears() -> None:
    s = Scheduler(max_batch=1)
    for i in range(3):
        s.add(entry(f"r{i}"))
    s.joined(s.plan(0.0).admit)
    assert [e.job.name for e in s.drain()] == ["r1", "r2"] and s.queued == 0
    assert [e.job.name for e in s.clear()] == ["r0"] and s.idle


def test_the_scheduler_is_pure() -> None:
    """No model, no tensors: importing it loads no torch (a fresh interpreter)."""
    code = "import sys, guardrail.serve.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
