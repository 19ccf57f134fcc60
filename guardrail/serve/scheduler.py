"""The worker's scheduler: which rows run, wait, get checked, search, finish or leave.

Pure bookkeeping, as the scheduler of vLLM's v1 engine core is: no model, no tensors, no
I/O, no clock of its own (the caller passes `now`), so every decision is unit-tested with a
fake executor (tests/test_scheduler.py). `LocalWorker` is the loop around it:

1. `plan(now)`: rows that leave (cancelled, past their deadline: waiting, decoding or
   searching alike), and the waiting requests to admit, up to the free batch slots. Waiting
   requests are taken round-robin across tenants (FIFO within one), so one tenant's burst
   never starves another's request; with `join` they join the batch already decoding (in
   groups of a quarter of its rows, or after `join_turns` turns: one prefill per group),
   and while nothing runs the first arrival waits up to `max_wait` for a batch to fill.
2. `joined(rows)`: admitted rows that decode (the others were answered at admission).
3. per decoding row and its new token: `ends_now` / `after_token` say whether the row
   keeps decoding, is due for a cost check of its next chunk, or is final; `check_sent`
   records a check that runs beside the decode (the row keeps decoding; its next check
   falls a chunk later), `checked` a check's outcome (text released up to `end`),
   `to_search` hands a row that went over budget to the search lane, `finish` ends a row.
4. `kept(rows)`: which of this step's rows stay in the decode batch.
5. `searching`: search rows, each advanced one pass per loop turn between the decode steps
   of everyone else, so a search never stalls the batch.

`add` is the only call from other threads (the worker holds a lock around it and `plan`);
it applies backpressure: past `max_queue` waiting requests a submission is refused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from guardrail.errors import OverloadedError

Phase = Literal["waiting", "running", "searching", "done"]
Leave = Literal["cancelled", "timeout"]
Verdict = Literal["keep", "check", "final"]


class Cancellable(Protocol):
    @property
    def cancelled(self) -> bool: ...


@dataclass(eq=False)
class Entry:
    """One request as the scheduler sees it; `job` is the worker's (opaque here)."""

    tenant: str
    submitted: float
    max_new_tokens: int
    ticket: Cancellable
    deadline: float | None = None
    job: Any = None
    # At its token limit, wait one decode step so the model reads the last token (the latent
    # cost model then scores the final check from states instead of a forward pass).
    reads_last: bool = False
    phase: Phase = "waiting"
    tokens: int = 0  # answer tokens picked
    released: int = 0  # answer tokens whose text passed its check
    checking: int | None = None  # a check of the first `checking` tokens is in flight
    reading_last: bool = False


@dataclass
class Plan:
    """One loop turn's admission: who leaves, who is admitted, or how long to wait first."""

    leave: list[tuple[Entry, Leave]] = field(default_factory=list)
    admit: list[Entry] = field(default_factory=list)
    wait: float = 0.0  # > 0: nothing runs and a batch is filling; plan again after this


class Scheduler:
    def __init__(
        self,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        chunk_tokens: int = 16,
        max_wait: float = 0.0,
        join: bool = True,
        join_group: int | None = None,
        join_turns: int = 4,
    ) -> None:
        """`join_group`, `join_turns`: arrivals join a running batch in groups of at least
        `join_group` (None: a quarter of the rows running, so under light load at once;
        fewer when fewer slots are free), or once they have waited `join_turns` loop turns:
        one prefill for a group costs less than one per arrival."""
        if max_batch < 1 or max_queue < 1 or chunk_tokens < 1:
            raise ValueError("max_batch, max_queue and chunk_tokens must be >= 1")
        self.max_batch, self.max_queue, self.chunk_tokens = max_batch, max_queue, chunk_tokens
        self.max_wait, self.join = max_wait, join
        self.join_group = join_group
        self.join_turns = join_turns
        self._held = 0  # loop turns arrivals have been held back from joining
        self._waiting: dict[str, deque[Entry]] = {}
        self._turn: list[str] = []  # tenants with waiting requests, next to serve first
        self._queued = 0
        self._fill_since: float | None = None  # when an idle scheduler saw its first arrival
        self.running: list[Entry] = []  # the decode batch, in row order
        self.searching: list[Entry] = []

    # --- admission -------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def active(self) -> int:
        return len(self.running) + len(self.searching)

    @property
    def idle(self) -> bool:
        """Nothing decoding or searching (waiting requests may exist)."""
        return not self.running and not self.searching

    def add(self, entry: Entry) -> None:
        """Queue a request; `OverloadedError` once `max_queue` are waiting (backpressure)."""
        if self._queued >= self.max_queue:
            raise OverloadedError(
                f"the guard worker is overloaded: {self.max_queue} requests already waiting; "
                "retry later"
            )
        entry.phase = "waiting"
        if entry.tenant not in self._waiting:
            self._waiting[entry.tenant] = deque()
            self._turn.append(entry.tenant)
        self._waiting[entry.tenant].append(entry)
        self._queued += 1

    def drain(self) -> list[Entry]:
        """Remove and return every waiting request (shutdown)."""
        out = [e for tenant in self._turn for e in self._waiting[tenant]]
        self._waiting, self._turn, self._queued = {}, [], 0
        for entry in out:
            entry.phase = "done"
        return out

    def plan(self, now: float) -> Plan:
        plan = Plan()
        for rows in (self.running, self.searching):
            for entry in list(rows):
                if (why := _leaves(entry, now)) is not None:
                    rows.remove(entry)
                    entry.phase = "done"
                    plan.leave.append((entry, why))
        for tenant in list(self._turn):
            for entry in list(self._waiting[tenant]):
                if (why := _leaves(entry, now)) is not None:
                    self._remove_waiting(entry)
                    entry.phase = "done"
                    plan.leave.append((entry, why))
        room = self.max_batch - len(self.running) if (self.join or not self.running) else 0
        if room <= 0 or not self._queued:
            if not self._queued:
                self._fill_since, self._held = None, 0
            return plan
        if self.idle and self._queued < room and self.max_wait > 0:
            if self._fill_since is None:
                self._fill_since = now
            left = self._fill_since + self.max_wait - now
            if left > 0:
                plan.wait = left
                return plan
        self._fill_since = None
        group = max(1, len(self.running) // 4) if self.join_group is None else self.join_group
        if self.running and self._queued < min(room, group):
            self._held += 1
            if self._held <= self.join_turns:
                return plan
        self._held = 0
        while room and self._turn:  # round-robin over tenants, FIFO within each
            tenant = self._turn.pop(0)
            queue = self._waiting[tenant]
            plan.admit.append(queue.popleft())
            self._queued -= 1
            room -= 1
            if queue:
                self._turn.append(tenant)
            else:
                del self._waiting[tenant]
        for entry in plan.admit:
            entry.phase = "done"  # until `joined`: answered at admission unless it decodes
        return plan

    def joined(self, entries: list[Entry]) -> None:
        """Admitted rows that decode, appended to the batch in this order."""
        for entry in entries:
            entry.phase = "running"
        self.running.extend(entries)

    def _remove_waiting(self, entry: Entry) -> None:
        queue = self._waiting[entry.tenant]
        queue.remove(entry)
        self._queued -= 1
        if not queue:
            del self._waiting[entry.tenant]
            self._turn.remove(entry.tenant)

    # --- decoding ----------------------------------------------------------------------------

    @staticmethod
    def ends_now(entry: Entry, eos: bool) -> bool:
        """The row's answer is complete before this step's token: it ended its turn, or it
        waited a step at its limit for its last token's states."""
        return eos or entry.reading_last

    def after_token(self, entry: Entry, *, stopped: bool) -> Verdict:
        """A new answer token was taken (`stopped`: its text completed a stop string)."""
        entry.tokens += 1
        if entry.tokens >= entry.max_new_tokens:
            if entry.reads_last:
                entry.reading_last = True
                return "keep"
            return "final"
        if stopped:
            return "final"
        # The newest token waits for the next check: its text may change with what follows.
        covered = entry.released if entry.checking is None else entry.checking
        if entry.tokens - 1 - covered >= self.chunk_tokens:
            return "check"
        return "keep"

    @staticmethod
    def check_sent(entry: Entry, end: int) -> None:
        """A check of the first `end` tokens runs beside the decode; the row keeps decoding,
        and its next check falls a chunk after `end` (it waits for this one's outcome)."""
        entry.checking = end

    @staticmethod
    def checked(entry: Entry, end: int) -> None:
        """The answer's first `end` tokens passed their check and were released."""
        entry.released = end
        if entry.checking is not None and entry.checking <= end:
            entry.checking = None

    def to_search(self, entry: Entry) -> None:
        """A row whose next chunk went over budget continues in the search lane."""
        if entry in self.running:
            self.running.remove(entry)
        entry.phase = "searching"
        entry.reading_last, entry.checking = False, None
        self.searching.append(entry)

    def finish(self, entry: Entry) -> None:
        for rows in (self.running, self.searching):
            if entry in rows:
                rows.remove(entry)
        entry.phase = "done"

    def kept(self, rows: list[Entry]) -> list[int]:
        """Indices of this step's `rows` that still decode (the batch's rows to keep)."""
        return [i for i, entry in enumerate(rows) if entry.phase == "running"]

    def clear(self) -> list[Entry]:
        """Remove and return every decoding and searching row (a failed step, shutdown)."""
        out = [*self.running, *self.searching]
        self.running, self.searching = [], []
        for entry in out:
            entry.phase = "done"
        return out


def _leaves(entry: Entry, now: float) -> Leave | None:
    if entry.ticket.cancelled:
        return "cancelled"
    if entry.deadline is not None and now >= entry.deadline:
        return "timeout"
    return None


__all__ = ["Cancellable", "Entry", "Leave", "Phase", "Plan", "Scheduler", "Verdict"]
