"""The shared model worker: one thread owns the model and serves many requests in micro-batches.

`Worker` is the one seam between the async `Guard` and whatever runs the model (this
in-process `LocalWorker` now, a Ray Serve deployment later): submit a `Request` with a `Sink`
that receives released text chunks and the final `Answer`, get a `Ticket` to cancel it.

`LocalWorker` is a thin loop (as vLLM's engine core is): it asks the pure scheduler
(`guardrail.serve.scheduler`: admission, fairness across tenants, joining, deadlines,
cancellation, backpressure, which rows are due for a check, hand-off to the search lane)
for a plan, runs it on the executor (`guardrail.runtime.executor`: every forward pass, and
every device and dtype decision), and reports the outcome back:

1. admit: the requests the scheduler admits are prefilled once with the gate's read-out and
   decided per row: plain (steering coefficient 0), steered (a second prefill of those rows
   only, with steering), or refused (answered at once with the refusal text, never decoded);
2. step: pick each row's next token under its own sampling settings; its text grows
   incrementally (`guardrail.runtime.detokenize`: no re-decoding of the whole answer), which
   also finds stop strings; release text a chunk at a time after the chunk check passes,
   drop rows that left (`select_rows`), then run one decode step for the rest with per-row
   steering coefficients;
3. join: between steps, admitted requests are appended to the running batch (`concat_rows`)
   when `join=True`. `bench/bench_worker.py` measures it against batch-at-a-time scheduling
   (`join=False`) on the same 64 requests: on SmolLM2-135M, 2 CPU threads, 8-32 new tokens,
   1/4/16/64 concurrent clients, 0.76/1.43/3.67/3.64 req/s with joining against
   0.71/1.24/3.46/3.34 without (2026-11-28), and lower mean latency, so joining stays on;
   without it a new request waits for the longest row in flight. After the scheduler
   rewrite (2026-12-06) joining each arrival at once fell 7-10% behind at 16 and 64 clients
   (arrivals prefilled one or two at a time: 34% more prefill time for 13% fewer decode
   steps); arrivals now join in groups of a quarter of the rows running (at once under light
   load), which brings it to 3% behind there and 18% ahead at 4 clients (`Scheduler`).

4. check: before a chunk is released, the cost model scores the answer so far (every row due
   in this step in one call); a chunk that would take a row over its budget is never
   released. The latent cost model reads the states the decode steps already computed (a
   hook keeps each row's running sum at its layers), so a chunk is checked one step after
   its last token, once the model has read it (an answer at its token limit waits one step
   for that; its stripped final text reads an earlier step's states); text it cannot read
   that way (a stop-string cut, a steered row, a search's answer) is run through the model.
   A cost model that does not run the target model (the MiniLM probe, a classifier) checks
   mid-answer text on a check thread of its own while the row keeps decoding (on a GPU the
   decode never waits for it); the chunk is released when its check passes, and the row's
   next check or its end waits for the outcome. A row over budget leaves the batch for the
   search lane (InferenceGuard), or ends with the refusal text when the tenant has no search
   (a check that ran beside the decode: from its last released prefix, as any other). The
   search continues from the row's own KV cache, cut back to its last prefix within budget,
   and its own token ids (nothing is re-tokenised or run again but that prefix's last
   token); its proxy reward reads each token's log-probability from the logits it was
   sampled from. Searches advance one forward pass per loop turn, between the decode steps
   of everyone else, so a slow search never stalls the batch. The refusal text's own cost
   is checked too; one over budget is replaced by an empty answer.

A broken cost model fails closed for the rows it was scoring, never for the batch.

Workers still running at interpreter exit are closed (not draining) and joined by an
`atexit` hook: a daemon thread left inside torch while the interpreter finalizes can abort
the process ("terminate called without an active exception", exit status 134).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from guardrail.budget.checks import cost_query
from guardrail.budget.latent import state_reader
from guardrail.budget.search import Scorers, SearchResult, SearchSettings, SearchStart, search
from guardrail.decision import DEFAULT_REFUSAL, Answer, Decision, OnFire, fired_steering
from guardrail.errors import GuardrailError, InputError, ShutdownError
from guardrail.gate.artifact import Calibration, SteeringSetting
from guardrail.gate.readout import read_weights, token_span
from guardrail.runtime.detokenize import Detokenizer
from guardrail.runtime.executor import Executor
from guardrail.runtime.forward import Prefilled, Sampling, concat_rows, select_rows
from guardrail.runtime.hooks import Steering
from guardrail.runtime.model import Chat, LanguageModel, Prompt
from guardrail.serve.scheduler import Entry, Scheduler

log = logging.getLogger(__name__)

# Seconds each worker gets at interpreter exit to leave its current step.
_EXIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Request:
    """One chat to answer, with its own sampling, policy action and deadline."""

    chat: Chat | str
    sampling: Sampling = field(default_factory=Sampling)
    guarded: bool = True
    on_fire: OnFire = "auto"
    refusal_text: str = DEFAULT_REFUSAL
    deadline: float | None = None  # time.monotonic() after which the answer is the refusal
    tenant: str = "default"
    gate_threshold: float | None = None  # the tenant's own; None: the calibrated one
    max_input_tokens: int | None = None  # longer prompts fail with InputError
    steering: SteeringSetting | None = None  # the tenant's own; None: the calibrated one
    # The answer starts with this text, written by the caller (a pre-started tool call): the
    # gate reads the prompt before it and the answer excludes it.
    response_prefix: str = ""
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    # No text whose cost exceeds `budget` is released (None: no cost check). A chunk that
    # would exceed it continues in `search` (None: the refusal text instead).
    budget: float | None = None
    # `refusal_text`'s cost, checked against `budget` once per tenant policy load (with no
    # prompt): a refusal answers with it. None, or a cost model that reads the prompt: the
    # worker costs the text itself.
    refusal_cost: float | None = None
    search: SearchSettings | None = None
    cost_model: str | None = None  # one of the worker's `Scorers.alternatives`; None: its own
    # Text whose first token's probability as the answer's first token the decision reports
    # (`first_token_prob`), read from the prefill logits: e.g. the opening of a tool call.
    probe: str = ""


class Sink(Protocol):
    """Receives a request's outcome, called from the worker's thread (so: thread-safe)."""

    def chunk(self, text: str) -> None:
        """Text that passed the cost check, in order."""

    def done(self, answer: Answer) -> None:
        """The final answer; called once, after the last chunk."""

    def fail(self, error: BaseException) -> None:
        """The request ended without an answer (cancelled, shut down, internal error)."""


class Ticket:
    """A handle on a submitted request; `cancel()` makes it leave its batch at the next step."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Worker(Protocol):
    """What the Guard needs from a model worker, in-process or remote: its calibration and
    cost model (to resolve tenants' policies against), submit and close."""

    @property
    def calibration(self) -> Calibration | None:
        """What the gate reads (None: the worker serves unguarded requests only)."""

    @property
    def scorers(self) -> Scorers | None:
        """The cost model a budget applies to (None: no cost checks)."""

    def submit(self, request: Request, sink: Sink) -> Ticket:
        """Queue a request; raises `OverloadedError` when full, `ShutdownError` when closing."""

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the ones taken (`drain`) or fail them."""


@dataclass
class _Job:
    request: Request
    sink: Sink
    ticket: Ticket
    submitted: float
    entry: Entry = field(init=False)
    prompt: str = ""
    tokens: list[int] = field(default_factory=list)
    released_tokens: int = 0
    released_text: str = ""
    coefficient: float = 0.0
    steering: SteeringSetting | None = None
    rendered: Prompt | None = None  # the prompt's ids and the user message's span in them
    generator: torch.Generator | None = None
    decision: Decision | None = None
    admitted: float = 0.0
    finished: bool = False
    query: str = ""  # what the cost model reads as the prompt: the last user message
    searched: bool = False
    # The latent cost model's layers at the last few tokens fed to the model (`mean`: summed
    # over the answer's tokens), each with how many answer tokens it covers: a check of
    # exactly those tokens reads them instead of a forward pass (a final answer stripped of
    # its trailing newlines reads an earlier one).
    states: deque[tuple[int, torch.Tensor]] = field(default_factory=lambda: deque(maxlen=4))
    scorers: Scorers | None = None  # the worker's, with the request's cost model
    detok: Detokenizer | None = None  # the answer's text, token by token
    fed: int = 0  # answer tokens in the row's KV cache
    # Each answer token's log-probability under the logits it was picked from (rows that
    # may search: the search's reward reads the prefix's from here).
    logprobs: list[float] = field(default_factory=list)
    pending: _Pending | None = None  # a check running beside the decode

    def __post_init__(self) -> None:
        request = self.request
        self.entry = Entry(
            tenant=request.tenant,
            submitted=self.submitted,
            max_new_tokens=request.sampling.max_new_tokens,
            ticket=self.ticket,
            deadline=request.deadline,
            job=self,
        )


@dataclass(frozen=True)
class _Pending:
    """A row's check on the check thread: the answer's first `end` tokens as `text`, whose cost
    is item `index` of the future's list."""

    future: Future[list[float | None]]
    index: int
    end: int
    text: str


@dataclass
class WorkerStats:
    """Counters for tests and benchmarks (read them; the worker thread writes them)."""

    steps: int = 0
    admitted: int = 0
    joined: int = 0  # requests that joined a batch already decoding
    max_rows: int = 0
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    searches: int = 0
    checks_beside: int = 0  # rows' checks that ran on the check thread


class LocalWorker:
    """A thread that owns the model and serves queued requests in micro-batches."""

    def __init__(
        self,
        lm: LanguageModel,
        calibration: Calibration | None,
        *,
        max_batch: int = 16,
        max_wait: float = 0.005,
        max_queue: int = 256,
        chunk_tokens: int = 16,
        scorers: Scorers | None = None,
        join: bool = True,
        torch_threads: int | None = None,
        checks_beside: bool | None = None,
        start: bool = True,
    ) -> None:
        """`torch_threads` sets the model thread's intra-op threads: on a shared CPU, fewer
        threads than cores avoids OpenMP spin-waiting against other processes (measured ~9x
        slower steps on a busy 2-core machine with 2 threads than with 1).

        `scorers`: the cost model (and the reward model and critic the search ranks by);
        without them requests with a budget are refused at submission.

        `checks_beside`: a mid-answer check by a cost model that does not run the target
        model (the MiniLM probe, a classifier) runs on a thread of its own while the row keeps
        decoding; its chunk is released when it passes (False: the decode waits for it).
        None: on when that thread has a core the decode does not use (the model is on an
        accelerator, or `torch_threads` leaves a CPU core free); measured on 2 cores with the
        model on both, it gains nothing (`bench/bench_overhead.py`)."""
        self.scheduler = Scheduler(
            max_batch=max_batch,
            max_queue=max_queue,
            chunk_tokens=chunk_tokens,
            max_wait=max_wait,
            join=join,
        )
        self.lm = lm
        self.executor = Executor(lm)
        self.calibration = calibration
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.chunk_tokens = chunk_tokens
        self.scorers = scorers
        self.join = join
        self.torch_threads = torch_threads
        self.stats = WorkerStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._accepting = True
        self._abort = False
        self._searches: dict[int, Generator[None, None, SearchResult]] = {}  # id(job) ->
        self._state: Prefilled | None = None
        self._rows: list[Entry] = []  # the rows of `_state`, in order (some may have left)
        self._eos = set(lm.eos_token_ids)
        self._vectors: dict[SteeringSetting, dict[int, torch.Tensor]] = {}
        self._probe_ids: dict[str, int] = {}
        self._latent = state_reader(scorers.cost) if scorers else None
        if checks_beside is None:
            spare = torch_threads is not None and torch_threads < (os.cpu_count() or 1)
            checks_beside = lm.device.type != "cpu" or spare
        self._checks = (
            ThreadPoolExecutor(1, thread_name_prefix="guardrail-checks")
            if scorers is not None and checks_beside
            else None
        )
        self._thread = threading.Thread(target=self._run, name="guardrail-worker", daemon=True)
        _LIVE_WORKERS.add(self)
        if start:
            self.start()

    # --- public API --------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Whether new requests are taken (False once closing): readiness for a server."""
        return self._accepting and self._thread.is_alive()

    def start(self) -> None:
        """Start the model thread (separate from `__init__` so tests can fill the queue first)."""
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, request: Request, sink: Sink) -> Ticket:
        if request.budget is not None and self.scorers is None:
            raise InputError("this request has a safety budget, but the worker has no cost model")
        if request.cost_model is not None:
            if self.scorers is None:
                raise InputError("this request names a cost model, but the worker has none")
            self.scorers.for_cost(request.cost_model)  # an unknown name fails here, clearly
        if request.guarded:
            if self.calibration is None:
                raise InputError("guarded requests need a calibration; this worker has none")
            try:  # fail fast on an impossible action, not in the model thread
                fired_steering(self.calibration, request.on_fire, request.steering)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
        ticket = Ticket()
        with self._wake:
            if not self._accepting:
                raise ShutdownError("the guard worker is shutting down; request not accepted")
            self.scheduler.add(_Job(request, sink, ticket, time.monotonic()).entry)
            self._wake.notify()
        return ticket

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        with self._wake:
            self._accepting = False
            self._abort = self._abort or not drain
            self._wake.notify()
        if not self._thread.is_alive():  # never started: nothing will serve the queue
            self._fail_queued(ShutdownError("the guard worker was closed before it started"))
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ShutdownError(f"the guard worker did not stop within {timeout} s")

    @property
    def queued(self) -> int:
        with self._lock:
            return self.scheduler.queued

    @property
    def active_rows(self) -> int:
        return self.scheduler.active

    @property
    def _jobs(self) -> list[_Job]:
        """The rows decoding now, in batch order."""
        return [entry.job for entry in self.scheduler.running]

    # --- the model thread: ask the scheduler, run its plan, report back ------------------------

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._checks is not None:
                self._checks.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        while True:
            with self._wake:
                if self._abort:
                    break
                plan = self.scheduler.plan(time.monotonic())
                if not plan.leave and not plan.admit and self.scheduler.idle:
                    if not self._accepting and not self.scheduler.queued:
                        return  # closed, drained, nothing in flight
                    # Nothing to run: wait for a request (or for a filling batch's deadline).
                    self._wake.wait(plan.wait or 0.05)
                    continue
            for entry, why in plan.leave:
                self._cancelled(entry.job) if why == "cancelled" else self._timeout(entry.job)
            admitted = [entry.job for entry in plan.admit]
            try:
                if admitted:
                    self._admit(admitted)
                if self._rows:
                    self._step()
                if self.scheduler.searching:
                    self._advance_searches()
            except Exception as exc:  # a model error fails the batch, not the worker
                log.exception("guard worker step failed")
                error = GuardrailError(f"generation failed: {exc}")
                failing = [entry.job for entry in self.scheduler.running] + admitted
                for job in failing:
                    if not job.finished:
                        self._fail(job, error)
                for entry in list(self.scheduler.running):
                    self.scheduler.finish(entry)
                self._state, self._rows = None, []
        self._fail_all(ShutdownError("the guard worker shut down before this finished"))

    def _admit(self, group: list[_Job]) -> None:
        """Prefill with the gate, decide each row, and append the decoding rows to the batch."""
        started = time.monotonic()
        lm, executor = self.lm, self.executor
        fits = []
        for job in group:
            job.rendered = lm.prompt(job.request.chat, job.request.response_prefix)
            job.prompt = job.rendered.text
            job.query = cost_query(job.request.chat)
            if self.scorers is not None:
                job.scorers = self.scorers.for_cost(job.request.cost_model)
            job.admitted = started
            n = job.rendered.end
            limit = job.request.max_input_tokens
            if limit is not None and n > limit:
                self._fail(job, InputError(f"the prompt has {n} tokens; the limit is {limit}"))
                continue
            fits.append(job)
            seed = job.request.sampling.seed
            if seed is not None:
                job.generator = executor.generator(seed)
            job.detok = Detokenizer(lm.tokenizer, job.request.stop)
        group = fits
        if not group:
            return
        prompts = [job.rendered for job in group if job.rendered is not None]
        gate = self.calibration.gate if self.calibration else None
        pool = tokens = None
        if gate is not None:
            width = max(len(p.ids) for p in prompts)
            pool = (gate.layers, read_weights(prompts, gate.reads, width))
            if gate.tokens is not None:
                tokens = (gate.tokens.per_layer(), token_span(prompts, width))
        gated = executor.prefill([p.ids for p in prompts], pool=pool, tokens=tokens)
        state = gated.state
        probes = self._probe_probs(group, state.next_logits)
        scores: list[float | None] = [None] * len(group)
        thresholds: list[float | None] = [None] * len(group)
        fired = [False] * len(group)
        if gate is not None and gated.pooled is not None:
            values: list[float] = gate.scores(gated.pooled, gated.token_sums).cpu().tolist()
            limits = [
                gate.threshold if job.request.gate_threshold is None else job.request.gate_threshold
                for job in group
            ]
            fired = [v > t for v, t in zip(values, limits, strict=True)]
            scores, thresholds = list(values), list(limits)
        prefill_ms = 1000 * (time.monotonic() - started)
        plain, steered = [], []
        for row, job in enumerate(group):
            request = job.request
            hit = request.guarded and bool(fired[row])
            job.decision = Decision(
                guarded=request.guarded,
                gate_score=scores[row] if request.guarded else None,
                threshold=thresholds[row] if request.guarded else None,
                fired=hit,
                path="plain" if request.guarded else "unguarded",
                gate_layers=list(gate.layers) if gate and request.guarded else None,
                timings_ms={
                    "queue": 1000 * (started - job.submitted),
                    "prefill": prefill_ms,
                },
                model=lm.fingerprint,
                tenant=request.tenant,
                prompt_tokens=int(state.attention_mask[row].sum()),
                budget=request.budget,
                first_token_prob=probes[row],
            )
            if not hit:
                plain.append(row)
            elif (
                setting := fired_steering(self.calibration, request.on_fire, request.steering)
            ) is not None:
                job.decision.path = "steered"
                job.decision.steering = setting.as_dict()
                job.coefficient, job.steering = setting.strength, setting
                steered.append(row)
            else:
                job.decision.path = "refused"
                self._refuse(job)
        self.stats.admitted += len(group)
        rows = [group[i] for i in plain + steered]
        if not rows:
            return
        new_state = select_rows(state, plain) if plain else None
        if steered:
            steering = self._steering([group[i] for i in steered])
            steered_started = time.monotonic()
            steered_state = executor.prefill(
                [prompts[i].ids for i in steered], steering=steering
            ).state
            steered_ms = 1000 * (time.monotonic() - steered_started)
            for i in steered:
                if (decision := group[i].decision) is not None:
                    decision.timings_ms["steered_prefill"] = steered_ms
            new_state = concat_rows(new_state, steered_state) if new_state else steered_state
        assert new_state is not None
        for job in rows:
            job.entry.reads_last = not job.coefficient and self._reads_states(job)
        if self._rows and self._state is not None:
            self._state = concat_rows(self._state, new_state)
            self.stats.joined += len(rows)
        else:
            self._state = new_state
        self._rows.extend(job.entry for job in rows)
        self.scheduler.joined([job.entry for job in rows])
        self.stats.max_rows = max(self.stats.max_rows, len(self.scheduler.running))

    def _probe_probs(self, group: list[_Job], logits: torch.Tensor) -> list[float | None]:
        """Each row's probability of its probe's first token as the next token (None: no probe)."""
        out: list[float | None] = [None] * len(group)
        asked = [(row, job.request.probe) for row, job in enumerate(group) if job.request.probe]
        if not asked:
            return out
        probs = torch.softmax(logits[[row for row, _ in asked]].float(), dim=-1)
        for (row, probe), row_probs in zip(asked, probs, strict=True):
            if probe not in self._probe_ids:
                ids = self.lm.tokenizer(probe, add_special_tokens=False)["input_ids"]
                self._probe_ids[probe] = int(ids[0])
            out[row] = float(row_probs[self._probe_ids[probe]])
        return out

    def _step(self) -> None:
        """Pick one token per row, release checked chunks, drop rows that left, decode once."""
        state = self._state
        assert state is not None
        entries = self._rows
        jobs: list[_Job] = [entry.job for entry in entries]
        picked = self.executor.pick(
            state.next_logits,
            [job.request.sampling for job in jobs],
            [job.generator for job in jobs],
        )
        searchable = [i for i, job in enumerate(jobs) if job.request.search is not None]
        logprobs = dict(
            zip(
                searchable,
                self.executor.logprobs(state.next_logits[searchable], picked[searchable]).tolist()
                if searchable
                else [],
                strict=True,
            )
        )
        for row, job in enumerate(jobs):  # checks that ran beside the last steps
            if job.pending is not None and job.pending.future.done():
                self._settle(job, state, row)
        due: list[tuple[_Job, bool, int]] = []  # rows whose pending text is checked now
        for row, (job, token) in enumerate(zip(jobs, picked.tolist(), strict=True)):
            if job.entry.phase != "running":  # it left (cancelled, past its deadline, search)
                continue
            # (the token after the limit, or after the end of turn, is unused)
            final = self.scheduler.ends_now(job.entry, token in self._eos)
            if not final:
                job.tokens.append(int(token))
                if row in logprobs:
                    job.logprobs.append(logprobs[row])
                assert job.detok is not None
                stopped = job.detok.add(int(token))
                verdict = self.scheduler.after_token(job.entry, stopped=stopped)
                if verdict == "keep":
                    continue
                final = verdict == "final"  # a check covers up to the newest token, which waits
            if job.pending is not None:  # the previous check comes first
                self._settle(job, state, row)
                if job.entry.phase != "running":
                    continue
            due.append((job, final, row))
        self._release(due, state)
        self.stats.steps += 1
        keep = self.scheduler.kept(entries)
        self._rows = [entries[i] for i in keep]
        if not keep:
            self._state = None
            return
        if len(keep) < len(jobs):
            state = select_rows(state, keep)
            picked = picked[keep]
            jobs = [jobs[i] for i in keep]
        steering = self._steering(jobs)
        reader = self._latent if any(self._reads_states(j) for j in jobs) else None
        out = self.executor.step(
            state, picked, steering=steering, record=reader.layers if reader else ()
        )
        self._state = out.state
        for job in jobs:
            job.fed = len(job.tokens)
        if reader is not None and out.recorded is not None:
            mean = reader.read == "mean"
            for job, row_state in zip(jobs, out.recorded, strict=True):
                if mean and job.states:
                    row_state = job.states[-1][1] + row_state  # the sum over the answer's tokens
                job.states.append((len(job.tokens), row_state))

    def _steering(self, jobs: list[_Job]) -> Steering | None:
        """Each row's own steering vectors (its tenant's setting); None if none is steered."""
        if not any(job.coefficient for job in jobs):
            return None
        assert self.calibration is not None
        for job in jobs:
            if job.steering is not None and job.steering not in self._vectors:
                self._vectors[job.steering] = self.calibration.steering_vectors(job.steering)
        per_row = [self._vectors[job.steering] if job.steering else {} for job in jobs]
        return self.executor.steering(per_row, [job.coefficient for job in jobs])

    # --- row outcomes --------------------------------------------------------------------------

    def _text(self, job: _Job, upto: int, *, final: bool) -> tuple[str, bool]:
        """The answer's first `upto` tokens as text: cut before a stop sequence, and (mid-
        answer) holding back a split character or what may be the start of a stop sequence;
        and whether that is all of those tokens' text (so their state is the text's state)."""
        detok = job.detok
        assert detok is not None
        if final:
            whole, exact = detok.full(upto), True
        else:  # a split character waits
            whole, exact = detok.text_at(upto), detok.complete_at(upto)
        text = whole
        stops = job.request.stop
        if stops:
            cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
            elif not final:
                keep = len(text) - max(len(s) for s in stops) + 1
                text = text[: max(keep, len(job.released_text))]
        return text, exact and text == whole

    def _release(self, due: list[tuple[_Job, bool, int]], state: Prefilled | None = None) -> None:
        """Check each row's answer so far against its budget (one cost call for all) and
        release what passes; `final` rows also finish. A row over budget goes to search
        (from its own KV cache, a row of `state`), or ends with the refusal text.

        A decoding row's mid-answer check by a cost model that does not run the target model
        goes to the check thread instead (`_beside`), and the row keeps decoding while it
        runs: `_settle` applies its outcome a step or more later. Nothing is released before
        its check passes, and a row over budget searches from its last released prefix."""
        ends = [len(job.tokens) if final else len(job.tokens) - 1 for job, final, _ in due]
        read = [
            self._text(job, n, final=final) for (job, final, _), n in zip(due, ends, strict=True)
        ]
        texts = [text for text, _ in read]
        states = [
            self._recorded(job, n) if exact else None
            for (job, _, _), (_, exact), n in zip(due, read, ends, strict=True)
        ]
        if state is not None and self._checks is not None:
            now = self._send_beside(due, ends, texts, states)
            due, ends = [due[i] for i in now], [ends[i] for i in now]
            texts, states = [texts[i] for i in now], [states[i] for i in now]
        # A final answer is returned stripped: when that changes it, both are checked.
        extra = [
            i
            for i, (text, (_, final, _)) in enumerate(zip(texts, due, strict=True))
            if final and text.strip() != text
        ]
        jobs = [job for job, _, _ in due]
        stripped = [(jobs[i], texts[i].strip()) for i in extra]
        costs = self._costs(
            jobs + [job for job, _ in stripped],
            texts + [text for _, text in stripped],
            states + [self._recorded_text(job, text) for job, text in stripped],
        )
        for n, i in enumerate(extra):
            first, second = costs[i], costs[len(due) + n]
            costs[i] = None if first is None or second is None else max(first, second)
        for (job, final, row), text, cost, end in zip(
            due, texts, costs[: len(due)], ends, strict=True
        ):
            self._checked(job, final, text, end, cost, state, row)

    def _send_beside(
        self,
        due: list[tuple[_Job, bool, int]],
        ends: list[int],
        texts: list[str],
        states: list[torch.Tensor | None],
    ) -> list[int]:
        """Send the mid-answer checks the check thread can run to it, in one cost call; the
        indices of `due` left to check now."""
        assert self._checks is not None
        beside = [
            i
            for i, ((job, final, _), row_state) in enumerate(zip(due, states, strict=True))
            if not final and row_state is None and self._beside(job)
        ]
        if not beside:
            return list(range(len(due)))
        jobs = [due[i][0] for i in beside]
        future = self._checks.submit(self._costs, jobs, [texts[i] for i in beside])
        for index, (job, i) in enumerate(zip(jobs, beside, strict=True)):
            job.pending = _Pending(future, index, ends[i], texts[i])
            self.scheduler.check_sent(job.entry, ends[i])
        self.stats.checks_beside += len(beside)
        sent = set(beside)
        return [i for i in range(len(due)) if i not in sent]

    def _checked(
        self,
        job: _Job,
        final: bool,
        text: str,
        end: int,
        cost: float | None,
        state: Prefilled | None,
        row: int,
    ) -> None:
        """A check's outcome: release the text (its first `end` tokens) within budget, or
        continue the row in search, or end it with the refusal text."""
        assert job.decision is not None
        budget = job.request.budget
        if budget is not None and (cost is None or cost > budget):
            searchable = self.scorers is not None and self._scorers(job).reward is not None
            can = cost is not None and job.request.search and searchable and not job.searched
            if can and state is not None:
                self._start_search(job, state, row)
            else:
                self._refuse(job, "cost_error" if cost is None else "over_budget")
            return
        chunk = text[len(job.released_text) :]
        job.released_tokens, job.released_text = end, text
        self.scheduler.checked(job.entry, end)
        job.decision.cost = cost
        if chunk:
            self._emit(job, chunk)
        if final:
            job.decision.new_tokens = len(job.tokens)
            self._finish(job, job.released_text.strip(), refusal=False)

    def _settle(self, job: _Job, state: Prefilled, row: int) -> None:
        """Apply the outcome of the row's check on the check thread (waiting for it if it is
        still running); a check that failed to run fails closed."""
        pending = job.pending
        assert pending is not None
        job.pending = None
        try:
            cost = pending.future.result()[pending.index]
        except Exception:
            log.exception("a check on the check thread failed; its row fails closed")
            cost = None
        self._checked(job, False, pending.text, pending.end, cost, state, row)

    def _costs(
        self,
        jobs: list[_Job],
        texts: list[str],
        states: list[torch.Tensor | None] | None = None,
    ) -> list[float | None]:
        """The cost of each text for its row (None: no budget, or the cost model failed for
        it). A row with the latent cost model's `states` of exactly that text is scored from
        them; the rest in one batched call, and if that fails row by row, so one bad input
        fails only itself."""
        rows = [i for i, job in enumerate(jobs) if job.request.budget is not None]
        out: list[float | None] = [None] * len(jobs)
        if not rows or self.scorers is None:
            return out
        if self._latent is not None and states is not None:
            read = {i: state for i in rows if (state := states[i]) is not None}
            if read:
                try:
                    values = self._latent.cost_of_states(torch.stack(list(read.values())))
                    for i, value in zip(read, values, strict=True):
                        out[i] = value
                except Exception:
                    log.exception("the latent cost model failed on states; its rows fail closed")
                rows = [i for i in rows if i not in read]
        by_model: dict[int, list[int]] = {}
        for i in rows:
            by_model.setdefault(id(self._scorers(jobs[i]).cost), []).append(i)
        for group in by_model.values():
            cost = self._scorers(jobs[group[0]]).cost
            try:
                values = cost.cost([jobs[i].query for i in group], [texts[i] for i in group])
                for i, value in zip(group, values, strict=True):
                    out[i] = float(value)
            except Exception:
                log.exception("the cost model failed on a batch; scoring its rows one by one")
                for i in group:
                    try:
                        out[i] = float(cost.cost([jobs[i].query], [texts[i]])[0])
                    except Exception:
                        log.exception("the cost model failed for a row; it fails closed")
        return out

    def _scorers(self, job: _Job) -> Scorers:
        assert self.scorers is not None
        return job.scorers or self.scorers

    def _beside(self, job: _Job) -> bool:
        """Whether the row's checks can run on the check thread: it has a budget, and its cost
        model does not run the target model (which only the model thread may)."""
        return job.request.budget is not None and state_reader(self._scorers(job).cost) is None

    def _recorded(self, job: _Job, n: int) -> torch.Tensor | None:
        """The latent cost model's read of the answer's first `n` tokens, if a recent decode
        step recorded it (a plain row whose checks read states); `mean`: already averaged."""
        if job.coefficient or not self._reads_states(job):
            return None
        assert self._latent is not None
        for count, state in job.states:
            if count == n:
                return state / n if self._latent.read == "mean" else state
        return None

    def _recorded_text(self, job: _Job, text: str) -> torch.Tensor | None:
        """`_recorded` for the recent token count whose whole text is `text`, if any."""
        for count, _ in job.states:
            if self._text(job, count, final=True) == (text, True):
                return self._recorded(job, count)
        return None

    def _reads_states(self, job: _Job) -> bool:
        """Whether the row's checks can read the decode states: it has a budget, and its cost
        model is the worker's own latent one."""
        return (
            job.request.budget is not None
            and self._latent is not None
            and self.scorers is not None
            and self._scorers(job).cost is self.scorers.cost
        )

    def _refuse(self, job: _Job, reason: str | None = None) -> None:
        """End with the refusal text, after checking its own cost: a refusal over budget (or
        that cannot be scored) becomes an empty answer."""
        assert job.decision is not None
        text = job.request.refusal_text
        if job.decision.path not in ("refused", "timeout"):
            job.decision.path = "refused"
        job.decision.reason = reason or job.decision.reason
        budget = job.request.budget
        if budget is not None:
            cost = job.request.refusal_cost  # checked at policy load, with no prompt
            if cost is None or self._scorers(job).cost.reads_prompt:
                cost = self._costs([job], [text])[0]
            job.decision.cost = cost
            if cost is None or cost > budget:
                text, job.decision.reason = "", "refusal_over_budget"
                job.decision.cost = None if cost is None else self._costs([job], [""])[0]
        self._finish(job, text)

    # --- the search lane -----------------------------------------------------------------------

    def _start_search(self, job: _Job, state: Prefilled, row: int) -> None:
        """Continue the row in InferenceGuard search from its last prefix within budget: its
        own KV cache (row `row` of `state`) cut back to that prefix, its own token ids."""
        assert job.decision is not None and job.request.search is not None
        assert job.request.budget is not None and job.rendered is not None
        scorers = self._scorers(job)
        job.decision.path = "search"
        job.searched = True
        job.states.clear()  # the search's answer is scored by text
        self.stats.searches += 1
        settings = job.request.search
        if settings.score == "critic" and scorers.critic is None:
            settings = replace(settings, score="augmented")
        settings = replace(settings, check=self.chunk_tokens)  # checked as the stream is
        steering = None
        if job.coefficient and job.steering is not None:  # filled when the row was steered
            steering = (self._vectors[job.steering], job.coefficient)
        released = job.released_tokens
        # Forget the tokens after the prefix and feed the prefix's last token again: its
        # logits and last hidden state are where the search starts.
        own = self.executor.drop_last(self.executor.take(state, [row]), job.fed - released + 1)
        last = job.tokens[released - 1] if released else job.rendered.ids[-1]
        hooks = self.executor.steering([steering[0]], [steering[1]]) if steering else None
        fed = self.executor.step(own, torch.tensor([last]), steering=hooks, hidden=True)
        assert fed.hidden is not None
        searchable = len(job.logprobs) >= released
        start = SearchStart(fed.state, fed.hidden, job.logprobs[:released] if searchable else None)
        generator = job.generator or self.executor.generator(0)
        left = job.request.sampling.max_new_tokens - released
        self.scheduler.to_search(job.entry)
        self._searches[id(job)] = search(
            self.lm,
            job.prompt,
            job.query,
            scorers,
            settings,
            budget=job.request.budget,
            max_new_tokens=max(left, 1),
            prefix=job.tokens[:released],
            steering=steering,
            generator=generator,
            start=start,
            executor=self.executor,
        )

    def _advance_searches(self) -> None:
        """One forward pass of each search; finished searches release their answer."""
        for entry in list(self.scheduler.searching):
            job = entry.job
            steps = self._searches[id(job)]
            outcome: SearchResult | None = None
            try:
                next(steps)
                continue
            except StopIteration as stop:
                outcome = stop.value
            except Exception:
                log.exception("a search failed; its row fails closed")
            self._end_search(job)
            self._searched(job, outcome)

    def _end_search(self, job: _Job) -> None:
        steps = self._searches.pop(id(job), None)
        if steps is not None:
            steps.close()

    def _searched(self, job: _Job, result: SearchResult | None) -> None:
        assert job.decision is not None
        if result is None:
            self._refuse(job, "search_error")
            return
        job.decision.candidates, job.decision.rounds = result.candidates, result.rounds
        job.decision.search_tokens = result.sampled
        job.decision.timings_ms.update(result.timings_ms)
        if result.tokens is None:
            self._refuse(job, "no_answer_within_budget")
            return
        job.tokens = list(result.tokens)
        job.detok = Detokenizer(self.lm.tokenizer, job.request.stop, job.tokens)
        self._release([(job, True, -1)])  # the whole answer is checked once more

    def _finish(self, job: _Job, text: str, *, refusal: bool = True) -> None:
        """Deliver the answer; a refusal is also released as the stream's last chunk."""
        assert job.decision is not None
        self.scheduler.finish(job.entry)
        if refusal:
            self._emit(job, text)
        job.decision.timings_ms["total"] = 1000 * (time.monotonic() - job.submitted)
        job.finished = True
        self.stats.completed += 1
        try:
            job.sink.done(Answer(text, job.decision))
        except Exception:
            log.exception("a request's sink failed")

    def _emit(self, job: _Job, text: str) -> None:
        try:
            job.sink.chunk(text)
        except Exception:
            log.exception("a request's sink failed")

    def _timeout(self, job: _Job) -> None:
        self._end_search(job)
        self.stats.timed_out += 1
        if job.decision is None:
            job.decision = Decision(
                guarded=job.request.guarded,
                gate_score=None,
                threshold=None,
                fired=False,
                path="timeout",
                model=self.lm.fingerprint,
                tenant=job.request.tenant,
            )
        job.decision.path, job.decision.reason = "timeout", "deadline"
        job.decision.new_tokens = len(job.tokens)
        self._refuse(job)

    def _cancelled(self, job: _Job) -> None:
        self._end_search(job)
        self.stats.cancelled += 1
        self._fail(job, CancelledError())

    def _fail(self, job: _Job, error: BaseException) -> None:
        self.scheduler.finish(job.entry)
        job.finished = True
        if not isinstance(error, CancelledError):
            self.stats.failed += 1
        try:
            job.sink.fail(error)
        except Exception:
            log.exception("a request's sink failed")

    def _fail_queued(self, error: BaseException) -> None:
        with self._lock:
            waiting = self.scheduler.drain()
        for entry in waiting:
            self._fail(entry.job, error)

    def _fail_all(self, error: BaseException) -> None:
        for entry in self.scheduler.clear():
            self._end_search(entry.job)
            self._fail(entry.job, error)
        self._state, self._rows = None, []
        self._fail_queued(error)


_LIVE_WORKERS: weakref.WeakSet[LocalWorker] = weakref.WeakSet()


@atexit.register
def _close_live_workers() -> None:
    """Stop every worker thread before the interpreter finalizes (see the module docstring).
    The thread is a daemon so that exit never waits on a forgotten `close()`; this makes that
    exit clean. Weak references: a worker nobody holds is never kept alive by this hook."""
    for worker in list(_LIVE_WORKERS):
        try:
            worker.close(drain=False, timeout=_EXIT_TIMEOUT_S)
        except Exception:
            log.exception("a guard worker did not stop at interpreter exit")


@dataclass
class Collected:
    """What one request produced: the chunks released, then its answer or the error it ended
    with (None until it ends)."""

    chunks: list[str] = field(default_factory=list)
    outcome: Answer | BaseException | None = None


def answer_all(
    worker: LocalWorker, requests: Sequence[Request], *, timeout: float = 600.0
) -> list[Collected]:
    """Submit every request, start the worker if it waits, and block this thread until each
    has ended: a worker driven without an event loop (scripts, benches, tests)."""
    ended = threading.Semaphore(0)
    out = [Collected() for _ in requests]

    class _Into:
        def __init__(self, item: Collected) -> None:
            self.item = item

        def chunk(self, text: str) -> None:
            self.item.chunks.append(text)

        def done(self, answer: Answer) -> None:
            self.item.outcome = answer
            ended.release()

        def fail(self, error: BaseException) -> None:
            self.item.outcome = error
            ended.release()

    for request, item in zip(requests, out, strict=True):
        worker.submit(request, _Into(item))
    worker.start()
    deadline = time.monotonic() + timeout
    for _ in requests:
        if not ended.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"the worker did not answer within {timeout} s")
    return out


__all__ = [
    "Collected",
    "LocalWorker",
    "Request",
    "Sink",
    "Ticket",
    "Worker",
    "WorkerStats",
    "answer_all",
]
