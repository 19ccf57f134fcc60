"""The `guardrail` command: chat, batch, score and calibrate on the embedded default or any model.

Errors the user can fix print one line naming the problem and exit with status 2; output
files are written to a temporary name and renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.calibrate.datasets import jsonl_lines
from guardrail.errors import GuardrailError, InputError

if TYPE_CHECKING:
    from guardrail.gate.artifact import Calibration
    from guardrail.runtime.forward import Sampling
    from guardrail.runtime.model import LanguageModel

BATCH_FORMAT = """\
IN.jsonl: one JSON object per line with "id" and "prompt" (a string, or a list of
{"role", "content"} messages); other fields are passed through unchanged.
OUT.jsonl: the same objects, in the same order, plus "response" (string) and "guard"
(the decision record: gate_score, threshold, fired, path, ...).
Each row is also appended to OUT.jsonl.partial as it finishes; OUT.jsonl appears only when
every row is done. After an interruption, run again with --resume to answer only the rest."""

SCORE_FORMAT = """\
IN.jsonl: one JSON object per line with "id", "prompt" (a string, or a list of
{"role", "content"} messages) and "response" (a string); other fields are passed through
unchanged (a "cost", "budget" or "over_budget" field is replaced).
OUT.jsonl: the same objects, in the same order, plus "cost" (float), "budget" (float: the
tenant's policy budget) and "over_budget" (bool: cost > budget). The cost is the one a served
answer is held to: the highest cost, under the tenant's cost model with the last user message
as the prompt, of the response at every 16-token chunk boundary (the target model's tokens)
and of the whole response. OUT.jsonl appears only when every row is scored."""


EVAL_FORMAT = """\
SET: a .csv, .jsonl or .json (array) file of prompts, in its own format (AdvBench goal,
HarmBench Behavior, JailbreakBench Goal, XSTest prompt, Alpaca instruction + input, or a
prompt/goal/behavior/instruction/question/query/request/text field). Labels: a row's `label`
(harmful/unsafe, benign/safe), else XSTest's type, else FILE:harmful|benign, else the format
(AdvBench and HarmBench are harmful), else --label.
DIR: rows.jsonl (every answer, judged), summary.json (per set: n, label, asr or over_refusal,
changed, fired, paths, over_budget_share, mean_cost, latency_ms, baseline), report.md and
gate_scores.png, gate_roc.png, paths_latency.png. Each answer is also appended to
DIR/rows.jsonl.partial as it finishes; after an interruption, --resume answers only the rest."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail", description="Inference-time safety guardrail for LLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=None,
            help="HF id, local path or .gguf (default: embedded SmolLM2-135M-Instruct)",
        )
        p.add_argument(
            "--harmful",
            action="append",
            metavar="FILE",
            help="harmful calibration prompts, repeatable (default: the shipped sets)",
        )
        p.add_argument(
            "--harmless",
            action="append",
            metavar="FILE",
            help="harmless calibration prompts, repeatable (default: the shipped sets)",
        )
        p.add_argument(
            "--aligned-model", default=None, help="safety-aligned sibling model for SSVs"
        )
        p.add_argument(
            "--recipe",
            choices=("default", "pooled", "jailbreak"),
            default="default",
            help="calibration recipe: default (shipped for the embedded model: a pooled probe "
            "and a per-token read that a suffix cannot hide a request from), pooled (the "
            "default without its token read: faster to calibrate, weaker against suffixes) or "
            "jailbreak (public jailbreak templates, suffixes and borderline sets: fewer false "
            "refusals, less recall on plain requests); see README",
        )
        p.add_argument(
            "--redis-url",
            default=None,
            help="share calibration artifacts through this Redis "
            "(default: $GUARDRAIL_REDIS_URL, or local files only)",
        )
        p.add_argument(
            "--shared-key-file",
            default=None,
            metavar="FILE",
            help="the operator's key that signs what is shared through Redis (default: "
            "$GUARDRAIL_SHARED_KEY_FILE or $GUARDRAIL_SHARED_KEY; without one Redis is not used)",
        )
        p.add_argument(
            "--cost-model",
            default=None,
            metavar="latent|minilm|ID_OR_PATH[:INDEX]",
            help="the calibrated cost model (default: minilm, a probe on MiniLM embeddings of "
            "the answer; latent: a probe on the model's own states), or a transformers "
            "sequence-classification model read as the cost (output INDEX, default 0)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    def tenancy(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--policies", metavar="DIR", default=None, help="a folder of tenant policy files"
        )
        p.add_argument(
            "--tenant", default="default", help="whose policy applies (needs --policies)"
        )

    def generation(p: argparse.ArgumentParser, *, unguarded: bool = True) -> None:
        common(p)
        if unguarded:
            p.add_argument("--unguarded", action="store_true", help="plain generation, no gate")
        p.add_argument(
            "--max-new-tokens", type=int, default=None, help="default: 128, or the policy's"
        )
        p.add_argument(
            "--temperature", type=float, default=None, help="0 is greedy (default, or the policy's)"
        )
        p.add_argument(
            "--on-fire",
            choices=["auto", "steer", "refuse"],
            default=None,
            help="what a prompt that fires the gate gets "
            "(auto: steer only if calibration met the refusal target); without --policies",
        )
        tenancy(p)

    chat = sub.add_parser("chat", help="answer one prompt")
    chat.add_argument("prompt")
    chat.add_argument("--json", action="store_true", help="print the response and decision as JSON")
    generation(chat)

    batch = sub.add_parser(
        "batch",
        help="answer a JSONL file of prompts",
        description=BATCH_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("input", metavar="IN.jsonl")
    batch.add_argument("--out", required=True, metavar="OUT.jsonl")
    batch.add_argument("--batch-size", type=int, default=16)
    batch.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in OUT.jsonl.partial (an interrupted run) and answer the rest",
    )
    generation(batch)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate the guard on labelled prompt sets: rows, summary, report and plots",
        description=EVAL_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "sets",
        nargs="+",
        metavar="SET",
        help="a .csv, .jsonl or .json prompt file; FILE:harmful or FILE:benign labels its prompts",
    )
    evaluate.add_argument("--out", required=True, metavar="DIR")
    evaluate.add_argument(
        "--baseline", action="store_true", help="also answer every prompt unguarded (same model)"
    )
    evaluate.add_argument(
        "--label",
        default=None,
        metavar="harmful|benign",
        help="the label of prompts without one (no `label` field, not FILE:LABEL, not AdvBench "
        "or HarmBench)",
    )
    evaluate.add_argument(
        "--split",
        default=None,
        choices=["fit", "select", "dev", "test"],
        help="keep only the prompts in this hash split (test: never seen by calibration)",
    )
    evaluate.add_argument(
        "--limit", type=int, default=None, metavar="N", help="the first N prompts of each set"
    )
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in DIR/rows.jsonl.partial (an interrupted run) and answer "
        "the rest",
    )
    generation(evaluate, unguarded=False)

    score = sub.add_parser(
        "score",
        help="score a JSONL file of (prompt, response) pairs with the tenant's cost model",
        description=SCORE_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("input", metavar="IN.jsonl")
    score.add_argument("--out", required=True, metavar="OUT.jsonl")
    common(score)
    tenancy(score)

    calibrate = sub.add_parser("calibrate", help="calibrate the gate and steering for a model")
    calibrate.add_argument(
        "--force", action="store_true", help="recalibrate even if artifacts exist"
    )
    common(calibrate)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--keys",
        metavar="FILE",
        default=None,
        help="YAML of tenant -> [SHA-256 of each API key] (default: $GUARDRAIL_API_KEYS, "
        "tenant=key pairs)",
    )
    serve.add_argument(
        "--policies", metavar="DIR", default=None, help="a folder of tenant policy files"
    )
    serve.add_argument("--max-batch", type=int, default=16)
    serve.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: one model worker in this process; ray: Ray Serve replicas (needs the "
        "`ray` extra)",
    )
    serve.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (--backend ray)")
    serve.add_argument(
        "--otel",
        action="store_true",
        help="an OpenTelemetry span per request (OTLP if OTEL_EXPORTER_OTLP_ENDPOINT is set "
        "and its exporter installed, else printed to stderr)",
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        help="connect to this Ray cluster (default: start a local Ray instance)",
    )
    common(serve)

    key = sub.add_parser("key", help="API keys for `guardrail serve`")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    new_key = key_sub.add_parser("new", help="print a new key and its line for the keys file")
    new_key.add_argument("tenant")

    policy = sub.add_parser("policy", help="tenant policy files: schema and validation")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_sub.add_parser("schema", help="print the policy JSON Schema")
    check = policy_sub.add_parser("check", help="validate every policy file in a folder")
    check.add_argument("directory", metavar="DIR")
    return parser


def read_requests(path: str | Path, *, responses: bool = False) -> list[dict[str, Any]]:
    """Parse and validate a batch input file; errors name the file, the line and the field.

    `responses`: each row also carries its answer, a string `response` (what `score` reads).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    records = []
    lines_of: dict[str, int] = {}  # id key -> line, for duplicate ids
    for number, record in jsonl_lines(path):
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object")
        for key in ("id", "prompt", "response") if responses else ("id", "prompt"):
            if key not in record:
                raise InputError(f"{path}:{number}: missing field {key!r}")
        prompt = record["prompt"]
        valid_messages = (
            isinstance(prompt, list)
            and prompt
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in prompt
            )
        )
        if not (isinstance(prompt, str) and prompt.strip()) and not valid_messages:
            raise InputError(
                f"{path}:{number}: field 'prompt' must be a non-empty string or a list of "
                "{role, content} messages"
            )
        if responses and not isinstance(record["response"], str):
            kind = type(record["response"]).__name__
            raise InputError(f"{path}:{number}: field 'response' must be a string, not {kind}")
        key = _id_key(record)
        if key in lines_of:  # a resumed run finds its finished rows by id
            raise InputError(
                f"{path}:{number}: field 'id': {key} is also the id on line {lines_of[key]}"
            )
        lines_of[key] = number
        records.append(record)
    if not records:
        raise InputError(f"{path}: no requests")
    return records


def _id_key(record: dict[str, Any]) -> str:
    """A row's id as a dict key: its JSON text, so 1, "1" and true stay apart."""
    return json.dumps(record["id"], sort_keys=True)


_ADDED = ("response", "guard")  # the fields a batch adds to each input row


def read_partial(
    path: Path,
    records: Sequence[dict[str, Any]],
    *,
    key_of: Callable[[dict[str, Any]], str] = _id_key,
) -> tuple[dict[str, str], int]:
    """The rows an interrupted run finished (row key -> its line) and the bytes they take.

    Only lines ending in a newline count: a crash can tear the last one, which is dropped.
    A row that is not one of the input's, or repeats an id, means the partial file belongs to
    another input: an error, never a guess. `key_of`: a row's key (default: its id).
    """
    inputs = {key_of(r): r for r in records}
    done: dict[str, str] = {}
    size = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                break  # torn by a crash mid-write: answered again
            try:
                line = raw.decode("utf-8")
                row = json.loads(line)
            except ValueError as exc:  # not UTF-8, or not JSON
                raise InputError(f"{path}:{number}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict) or "id" not in row:
                raise InputError(f"{path}:{number}: missing field 'id'")
            try:
                key = key_of(row)
            except KeyError as exc:
                raise InputError(f"{path}:{number}: missing field {exc.args[0]!r}") from exc
            record = inputs.get(key)
            if record is None:
                raise InputError(
                    f"{path}:{number}: field 'id': {key} is not in the input; "
                    "delete the partial file to start over"
                )
            if key in done:
                raise InputError(f"{path}:{number}: field 'id': {key} is answered twice")
            changed = [k for k, v in record.items() if k not in _ADDED and row.get(k) != v]
            if changed:
                raise InputError(
                    f"{path}:{number}: field {changed[0]!r} differs from the input's row {key}; "
                    "delete the partial file to start over"
                )
            done[key] = line
            size += len(raw)
    return done, size


def _write_atomically(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, renamed on success)
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    )
    try:
        with handle:
            handle.writelines(lines)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _load(args: argparse.Namespace) -> tuple[LanguageModel, Calibration | None]:
    """The model and (unless `--unguarded`) its calibration, stored or made now."""
    from guardrail.calibrate.gate import CalibrationConfig
    from guardrail.calibrate.store import default_store, load_or_calibrate
    from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model

    lm = load_model(args.model or EMBEDDED_DEFAULT)
    calibration = None
    if not getattr(args, "unguarded", False):
        recipes = {
            "jailbreak": CalibrationConfig.jailbreak_augmented,
            "pooled": CalibrationConfig.pooled_only,
        }
        config = recipes.get(args.recipe, CalibrationConfig)(aligned_model=args.aligned_model)
        if args.harmful:
            config.harmful = args.harmful
        if args.harmless:
            config.harmless = args.harmless
        calibration = load_or_calibrate(
            lm,
            config,
            store=default_store(args.redis_url),
            force=getattr(args, "force", False),
            progress=not args.quiet,
        )
    return lm, calibration


def _scorers(args: argparse.Namespace, lm: LanguageModel, calibration: Calibration | None) -> Any:
    """The calibrated cost model, reward and critic (calibrated once, like the gate)."""
    if calibration is None:
        return None
    from guardrail.calibrate.store import load_scorers

    return load_scorers(
        lm,
        calibration,
        redis_url=args.redis_url,
        cost_model=args.cost_model,
        progress=not args.quiet,
    )


def _guard(
    args: argparse.Namespace,
    sampling: Any,
    *,
    max_batch: int = 16,
    queue: int = 1,
    start: bool = True,
    unguarded_too: bool = False,
) -> Any:
    """The same `Guard` that services use, over a worker sized for this run.

    `--unguarded` and `--on-fire` become the default tenant's policy; the worker's queue holds
    the whole input, so a batch file never meets backpressure. `start=False` leaves the
    worker's thread unstarted, for a run that only reads its policies and cost model.
    `unguarded_too`: the run also answers unguarded, which the tenant's policy must allow.
    """
    from guardrail.serve.guard import Guard
    from guardrail.serve.worker import LocalWorker
    from guardrail.tenants.store import PolicyStore, TenantPolicy

    policies: Any
    on_fire = getattr(args, "on_fire", None)
    if args.policies:
        if on_fire is not None:
            raise InputError("--on-fire is the policy's `on_fire` when --policies is given")
        policies = PolicyStore(args.policies)  # invalid files: PolicyError before any loading
        policy = policies.get(args.tenant)  # an unknown tenant fails here, not per request
        if unguarded_too and not policy.allow_unguarded:
            raise InputError(
                f"--baseline answers unguarded, which tenant {args.tenant!r}'s policy does not "
                "allow (allow_unguarded: false)"
            )
    elif args.tenant != "default":
        raise InputError(f"--tenant {args.tenant} needs --policies DIR")
    else:
        policy = TenantPolicy(on_fire=on_fire or "auto", sampling=sampling, allow_unguarded=True)
        policies = {"default": policy}
    lm, calibration = _load(args)
    if on_fire is not None and calibration is not None:
        from guardrail.decision import fired_steering

        try:  # `steer` with no calibrated steering: an error now, before any answer
            fired_steering(calibration, on_fire)
        except ValueError as exc:
            raise InputError(f"--on-fire {on_fire}: {exc}") from exc
    worker = LocalWorker(
        lm,
        calibration,
        max_batch=max_batch,
        max_queue=max(queue, 1),
        scorers=_scorers(args, lm, calibration),
        start=start,
    )
    return Guard(worker=worker, policies=policies)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-request options: the tenant, and the flags the user gave (over the policy's)."""
    options: dict[str, Any] = {"tenant": args.tenant}
    if getattr(args, "unguarded", False):
        options["guarded"] = False
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    return options


def _answer_all(
    guard: Any,
    requests: Sequence[tuple[Any, dict[str, Any]]],
    on_answer: Callable[[int, Any], None],
    *,
    done: int,
    total: int,
    quiet: bool,
) -> None:
    """Submit every (prompt, options) request at once (the worker batches them);
    `on_answer(i, answer)` runs as each one finishes, so an interrupted run keeps what it
    finished. The bar counts the `done` rows of an earlier run too, its rate and time left
    only this run's."""
    import asyncio

    from tqdm.auto import tqdm

    async def answer_all() -> None:
        bar = tqdm(total=total, initial=done, desc="answers", unit="row", disable=quiet)

        async def one(i: int, prompt: Any, options: dict[str, Any]) -> None:
            on_answer(i, await guard.generate(prompt, **options))
            bar.update(1)

        try:
            await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(requests)))
        finally:
            bar.close()

    asyncio.run(answer_all())


def _resume_partial(
    partial: Path,
    records: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    *,
    key_of: Callable[[dict[str, Any]], str] = _id_key,
) -> tuple[dict[str, str], int]:
    """The rows an interrupted run left in `partial` (row key -> line) and their bytes; an
    error, never an overwrite, when it has rows and `--resume` was not given."""
    if not (partial.is_file() and partial.stat().st_size):
        return {}, 0
    if not args.resume:
        raise InputError(
            f"{partial}: rows of an interrupted run; pass --resume to keep them and answer "
            "the rest, or delete the file to start over"
        )
    done, size = read_partial(partial, records, key_of=key_of)
    if not args.quiet:
        print(f"resuming: {len(done)} of {len(records)} rows in {partial}", file=sys.stderr)
    return done, size


def _answer_into_partial(
    guard: Any,
    partial: Path,
    size: int,
    jobs: Sequence[tuple[str, Any, dict[str, Any], Callable[[Any], str]]],
    done: dict[str, str],
    *,
    total: int,
    quiet: bool,
) -> None:
    """Answer each (key, prompt, options, line_of) job through the guard; each answer's line
    (`line_of(answer)`) is appended to `partial` the moment it finishes and kept in
    `done[key]`. After the first `size` bytes of `partial` (the rows kept by `--resume`; a
    torn last line goes). On any failure, Ctrl-C included, the guard stops at once: what
    finished stays in `partial` for `--resume`. The guard stays open on success."""
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("a", encoding="utf-8") as sink:
            sink.truncate(size)

            def finished(k: int, answer: Any) -> None:
                key, _, _, line_of = jobs[k]
                line = line_of(answer)
                sink.write(line)
                sink.flush()
                done[key] = line

            _answer_all(
                guard,
                [(prompt, options) for _, prompt, options, _ in jobs],
                finished,
                done=len(done),
                total=total,
                quiet=quiet,
            )
    except BaseException as exc:
        guard.close(drain=False)  # stop now: what finished is in the partial file
        if isinstance(exc, KeyboardInterrupt):
            print(
                f"interrupted: {len(done)} of {total} rows kept in {partial}; "
                "run the same command with --resume to answer the rest",
                file=sys.stderr,
            )
        raise


def _offline_costs(
    guard: Any,
    tenant: str,
    prompts: Sequence[Any],
    responses: Sequence[str],
    *,
    quiet: bool,
) -> list[tuple[float, float]]:
    """(cost, budget) of each existing response as the served guard would check it: the
    tenant's budget and cost model, the answer at every chunk boundary and whole (see
    `answer_costs`). Nothing is generated; the guard's worker need not run."""
    from tqdm.auto import tqdm

    from guardrail.budget.checks import answer_costs, cost_query

    worker = guard.worker
    # The request the guard would build for each row: its budget (the policy's; a refusal
    # text over it is a policy error, as when serving) and the chat the cost model reads.
    requests = [guard.request(prompt, tenant=tenant) for prompt in prompts]
    out: list[tuple[float, float]] = []
    step = 32  # rows per cost call: bounded memory, a moving progress bar
    with tqdm(total=len(prompts), desc="scores", unit="row", disable=quiet) as bar:
        for start in range(0, len(prompts), step):
            asked = requests[start : start + step]
            costs = answer_costs(
                worker.scorers.cost,
                [cost_query(request.chat) for request in asked],
                list(responses[start : start + step]),
                tokenizer=worker.lm.tokenizer,
                chunk_tokens=worker.chunk_tokens,
            )
            for request, cost in zip(asked, costs, strict=True):
                assert request.budget is not None  # guarded, with a cost model: always set
                out.append((cost, float(request.budget)))
            bar.update(len(asked))
    return out


def _sampling(args: argparse.Namespace) -> Sampling:
    from guardrail.runtime.forward import Sampling

    try:
        return Sampling(
            max_new_tokens=128 if args.max_new_tokens is None else args.max_new_tokens,
            temperature=args.temperature or 0.0,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "shared_key_file", None):
        from guardrail.cache.signing import SHARED_KEY_FILE_ENV, read_key_file

        read_key_file(args.shared_key_file)  # a clear error now, not in a replica later
        # Through the environment, so that every part that opens Redis (and Ray's replicas)
        # signs and checks with this key.
        os.environ[SHARED_KEY_FILE_ENV] = str(Path(args.shared_key_file).resolve())
    if args.command == "batch":
        return _batch(args)
    elif args.command == "eval":
        return _eval(args)
    elif args.command == "score":
        return _score(args)
    elif args.command == "chat":
        sampling = _sampling(args)
        guard = _guard(args, sampling)
        try:
            answer = guard.generate_sync(args.prompt, **_options(args))
        finally:
            guard.close()
        if args.json:
            print(
                json.dumps({"response": answer.text, "guard": answer.decision.as_dict()}, indent=2)
            )
        else:
            print(answer.text)
    elif args.command == "policy":
        return _policy_command(args)
    elif args.command == "key":
        import secrets

        from guardrail.serve.http import hash_key

        key = f"gr-{secrets.token_urlsafe(32)}"
        print(f"key (give it to the tenant; it is not stored): {key}")
        print(f"keys file line:\n{args.tenant}:\n  - {hash_key(key)}")
    elif args.command == "serve":
        return _serve(args)
    elif args.command == "calibrate":
        from guardrail.calibrate.store import default_store, load_or_calibrate_safety

        lm, calibration = _load(args)
        assert calibration is not None
        manifest = calibration.to_artifacts().manifest
        report = {k: manifest[k] for k in ("gate", "srv_gate", "steering", "steering_meets_target")}
        safety = load_or_calibrate_safety(
            lm,
            calibration,
            store=default_store(args.redis_url),
            force=args.force,
            progress=not args.quiet,
        )
        report["cost_model_and_critic"] = safety.manifest.get("report")
        print(json.dumps(report, indent=2))
    return 0


def _batch(args: argparse.Namespace) -> int:
    """Answer the input file; finished rows go to OUT.partial at once, OUT when all are done."""
    records = read_requests(args.input)  # validate before loading anything
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = _sampling(args)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    done, size = _resume_partial(partial, records, args)
    # Submitted shortest first, so similar lengths share a batch (less padding); the output
    # keeps the input order.
    order = sorted(
        (i for i, r in enumerate(records) if _id_key(r) not in done),
        key=lambda i: len(json.dumps(records[i]["prompt"])),
    )
    if order:
        guard = _guard(args, sampling, max_batch=args.batch_size, queue=len(order))
        options = _options(args)

        def line_of(record: dict[str, Any]) -> Callable[[Any], str]:
            def line(answer: Any) -> str:
                row = {**record, "response": answer.text, "guard": answer.decision.as_dict()}
                return json.dumps(row) + "\n"

            return line

        jobs = [
            (_id_key(records[i]), records[i]["prompt"], options, line_of(records[i])) for i in order
        ]
        _answer_into_partial(guard, partial, size, jobs, done, total=len(records), quiet=args.quiet)
        guard.close()
    lines = [done[_id_key(record)] for record in records]
    _write_atomically(out, lines)
    partial.unlink(missing_ok=True)
    fired = sum(bool(json.loads(line)["guard"]["fired"]) for line in lines)
    print(f"wrote {len(lines)} answers to {args.out} ({fired} fired the gate)", file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    """Score each row's response as the served guard would check it, with the model, cost
    model and tenant policy `batch` would use; OUT is written only when every row is scored."""
    from guardrail.runtime.forward import Sampling

    records = read_requests(args.input, responses=True)  # validate before loading anything
    guard = _guard(args, Sampling(), start=False)  # nothing is generated: never started
    try:
        scored = _offline_costs(
            guard,
            args.tenant,
            [r["prompt"] for r in records],
            [r["response"] for r in records],
            quiet=args.quiet,
        )
    finally:
        guard.close()
    lines: list[str] = []
    over = 0
    for record, (cost, budget) in zip(records, scored, strict=True):
        row = {**record, "cost": cost, "budget": budget, "over_budget": cost > budget}
        lines.append(json.dumps(row) + "\n")
        over += cost > budget
    _write_atomically(Path(args.out), lines)
    print(f"wrote {len(lines)} scores to {args.out} ({over} over budget)", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Answer every prompt of every set through the guard (and unguarded with --baseline),
    judge each answer, and write DIR/rows.jsonl, summary.json, report.md and the plots; each
    answer goes to DIR/rows.jsonl.partial at once, the final files when all are done."""
    import time

    from guardrail.calibrate import evalreport
    from guardrail.calibrate.evalsets import read_sets
    from guardrail.calibrate.judge import is_refusal

    started = time.monotonic()
    # Validate everything before loading anything.
    sets = read_sets(args.sets, label=args.label, split=args.split, limit=args.limit)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = _sampling(args)
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: --out must be a folder, and this is a file")
    partial = folder / "rows.jsonl.partial"
    variants = ("guarded", "baseline") if args.baseline else ("guarded",)
    records = [
        {"set": s.name, "variant": v, "id": row.id, "label": row.label, "prompt": row.prompt}
        for s in sets
        for row in s.rows
        for v in variants
    ]

    def key_of(row: dict[str, Any]) -> str:
        return json.dumps([row["set"], row["variant"], row["id"]])

    done, size = _resume_partial(partial, records, args, key_of=key_of)
    # Shortest first, so similar lengths share a batch; the output keeps the sets' order.
    order = sorted(
        (i for i, r in enumerate(records) if key_of(r) not in done),
        key=lambda i: len(json.dumps(records[i]["prompt"])),
    )
    guard = _guard(
        args,
        sampling,
        max_batch=args.batch_size,
        queue=len(order),
        start=bool(order),
        unguarded_too=args.baseline,
    )
    options = _options(args)

    def line_of(record: dict[str, Any]) -> Callable[[Any], str]:
        def line(answer: Any) -> str:
            decision = answer.decision.as_dict()
            row = {
                **record,
                "response": answer.text,
                "guard": decision,
                "refused": is_refusal(answer.text) or not answer.text.strip(),
            }
            if record["variant"] == "guarded":  # held to the budget as it was generated
                cost, budget = decision["cost"], decision["budget"]
                over = None if cost is None or budget is None else cost > budget
                row.update(cost=cost, budget=budget, over_budget=over)
            return json.dumps(row) + "\n"

        return line

    jobs = [
        (
            key_of(records[i]),
            records[i]["prompt"],
            options if records[i]["variant"] == "guarded" else {**options, "guarded": False},
            line_of(records[i]),
        )
        for i in order
    ]
    if jobs:
        _answer_into_partial(guard, partial, size, jobs, done, total=len(records), quiet=args.quiet)
    try:
        rows = [json.loads(done[key_of(record)]) for record in records]
        # Unguarded answers: the cost the served guard would have held them to, offline.
        baseline = [row for row in rows if row["variant"] == "baseline"]
        if baseline:
            costs = _offline_costs(
                guard,
                args.tenant,
                [row["prompt"] for row in baseline],
                [row["response"] for row in baseline],
                quiet=args.quiet,
            )
            for row, (cost, budget) in zip(baseline, costs, strict=True):
                row.update(cost=cost, budget=budget, over_budget=cost > budget)
        policy = guard.policy(args.tenant)
        model_name = guard.worker.lm.name
    finally:
        guard.close()
    max_new_tokens = args.max_new_tokens or policy.sampling.max_new_tokens
    run_info = {
        "model": model_name,
        "fingerprint": next((row["guard"]["model"] for row in rows), None),
        "tenant": args.tenant,
        "on_fire": policy.on_fire,
        "max_new_tokens": max_new_tokens,
        "split": args.split,
        "limit": args.limit,
        "baseline": bool(args.baseline),
    }
    summary = evalreport.summarize(rows, files={s.name: str(s.path) for s in sets}, run=run_info)
    # Everything goes to temporary names first: the final files appear only together.
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".eval-") as scratch:
        notes = evalreport.write_plots(rows, Path(scratch))
        (Path(scratch) / "summary.json").write_text(
            json.dumps(summary, indent=2) + "\n", encoding="utf-8"
        )
        (Path(scratch) / "report.md").write_text(
            evalreport.report_markdown(summary, notes), encoding="utf-8"
        )
        (Path(scratch) / "rows.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
        )
        if not (Path(scratch) / "gate_roc.png").exists():
            (folder / "gate_roc.png").unlink(missing_ok=True)  # an older run's
        for made in sorted(Path(scratch).iterdir(), key=lambda p: p.name == "rows.jsonl"):
            os.replace(made, folder / made.name)  # rows.jsonl last
    partial.unlink(missing_ok=True)
    if not args.quiet:
        for key, entry in summary["sets"].items():
            figure = "asr" if entry["label"] == "harmful" else "over_refusal"
            base = entry.get("baseline")
            against = f" (unguarded {base[figure]})" if base else ""
            print(
                f"{key}: {entry['n']} {entry['label']}, {figure} {entry[figure]}{against}, "
                f"fired {entry['fired']}",
                file=sys.stderr,
            )
    print(
        f"wrote {len(rows)} answers, summary, report and plots to {folder} "
        f"in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from guardrail.serve.guard import Guard
    from guardrail.serve.http import API_KEYS_ENV, ApiKeys, create_app
    from guardrail.tenants.store import PolicyStore

    keys = ApiKeys.from_file(args.keys) if args.keys else ApiKeys.from_env()
    if not len(keys):
        raise InputError(f"no API keys: give --keys FILE or set {API_KEYS_ENV}")
    policies = PolicyStore(args.policies) if args.policies else None
    if args.backend == "ray":
        guard, model_id = _ray_guard(args, policies)
    else:
        lm, calibration = _load(args)
        guard = Guard(
            lm,
            calibration,
            policies=policies,
            max_batch=args.max_batch,
            scorers=_scorers(args, lm, calibration),
        )
        model_id = lm.name
    for tenant in sorted(keys.tenants):  # a key for a tenant without a policy: fail at start
        guard.policy(tenant)
    tracing = None
    if args.otel:
        from guardrail.serve.tracing import Tracing, console_provider

        tracing = Tracing(console_provider())
    app = create_app(guard, keys, model_id=model_id, tracing=tracing)
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        guard.close()
    return 0


def _ray_guard(args: argparse.Namespace, policies: Any) -> tuple[Any, str]:
    """A Guard over Ray Serve replicas, each calibrated from the shared artifact store."""
    if args.harmful or args.harmless or args.aligned_model or args.recipe != "default":
        raise InputError(
            "--backend ray calibrates with the default recipe on the shipped data only"
        )
    if args.replicas < 1:
        raise InputError(f"--replicas must be >= 1, got {args.replicas}")
    try:
        from guardrail.serve.ray import RayWorker
    except ImportError as exc:
        raise InputError(
            f"--backend ray needs Ray Serve: pip install 'guardrail[ray]' ({exc})"
        ) from exc
    from guardrail.runtime.model import EMBEDDED_DEFAULT
    from guardrail.serve.guard import Guard

    worker = RayWorker(
        replicas=args.replicas,
        address=args.ray_address,
        redis_url=args.redis_url,
        shared_key_file=args.shared_key_file,
        model=args.model or EMBEDDED_DEFAULT,
        worker_options={"max_batch": args.max_batch},
    )
    return Guard(worker=worker, policies=policies), worker.model_name


def _policy_command(args: argparse.Namespace) -> int:
    from guardrail.tenants.schema import Policy, check_policies

    if args.policy_command == "schema":
        print(json.dumps(Policy.model_json_schema(), indent=2))
        return 0
    policies, problems = check_policies(args.directory)
    for problem in problems:
        print(f"guardrail: error: {problem}", file=sys.stderr)
    for tenant in sorted(policies):
        print(f"ok: {tenant}")
    return 2 if problems else 0


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="guardrail: %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours say more
    try:
        sys.exit(run(argv))
    except GuardrailError as exc:
        print(f"guardrail: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
