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

    def generation(p: argparse.ArgumentParser) -> None:
        common(p)
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
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON: {exc.msg}") from exc
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


def read_partial(path: Path, records: Sequence[dict[str, Any]]) -> tuple[dict[str, str], int]:
    """The rows an interrupted run finished (id key -> its line) and the bytes they take.

    Only lines ending in a newline count: a crash can tear the last one, which is dropped.
    A row that is not one of the input's, or repeats an id, means the partial file belongs to
    another input: an error, never a guess.
    """
    inputs = {_id_key(r): r for r in records}
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
            key = _id_key(row)
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
        config = CalibrationConfig(aligned_model=args.aligned_model)
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
) -> Any:
    """The same `Guard` that services use, over a worker sized for this run.

    `--unguarded` and `--on-fire` become the default tenant's policy; the worker's queue holds
    the whole input, so a batch file never meets backpressure. `start=False` leaves the
    worker's thread unstarted, for a run that only reads its policies and cost model.
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
        policies.get(args.tenant)  # an unknown tenant fails here, not per request
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
    if args.unguarded:
        options["guarded"] = False
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    return options


def _answer_all(
    guard: Any,
    prompts: Sequence[Any],
    options: dict[str, Any],
    on_answer: Callable[[int, Any], None],
    *,
    done: int,
    total: int,
    quiet: bool,
) -> None:
    """Submit every prompt at once (the worker batches them); `on_answer(i, answer)` runs as
    each one finishes, so an interrupted run keeps what it finished. The bar counts the `done`
    rows of an earlier run too, its rate and time left only this run's."""
    import asyncio

    from tqdm.auto import tqdm

    async def answer_all() -> None:
        bar = tqdm(total=total, initial=done, desc="answers", unit="row", disable=quiet)

        async def one(i: int, prompt: Any) -> None:
            on_answer(i, await guard.generate(prompt, **options))
            bar.update(1)

        try:
            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            bar.close()

    asyncio.run(answer_all())


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
    done: dict[str, str] = {}
    size = 0
    if partial.is_file() and partial.stat().st_size:
        if not args.resume:
            raise InputError(
                f"{partial}: rows of an interrupted run; pass --resume to keep them and answer "
                "the rest, or delete the file to start over"
            )
        done, size = read_partial(partial, records)
        if not args.quiet:
            print(f"resuming: {len(done)} of {len(records)} rows in {partial}", file=sys.stderr)
    # Submitted shortest first, so similar lengths share a batch (less padding); the output
    # keeps the input order.
    order = sorted(
        (i for i, r in enumerate(records) if _id_key(r) not in done),
        key=lambda i: len(json.dumps(records[i]["prompt"])),
    )
    if order:
        guard = _guard(args, sampling, max_batch=args.batch_size, queue=len(order))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("a", encoding="utf-8") as sink:
                sink.truncate(size)  # a torn last line, if any, goes

                def finished(k: int, answer: Any) -> None:
                    record = records[order[k]]
                    row = {**record, "response": answer.text, "guard": answer.decision.as_dict()}
                    line = json.dumps(row) + "\n"
                    sink.write(line)
                    sink.flush()
                    done[_id_key(record)] = line

                _answer_all(
                    guard,
                    [records[i]["prompt"] for i in order],
                    _options(args),
                    finished,
                    done=len(done),
                    total=len(records),
                    quiet=args.quiet,
                )
        except BaseException as exc:
            guard.close(drain=False)  # stop now: what finished is in the partial file
            if isinstance(exc, KeyboardInterrupt):
                print(
                    f"interrupted: {len(done)} of {len(records)} rows kept in {partial}; "
                    "run the same command with --resume to answer the rest",
                    file=sys.stderr,
                )
            raise
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
    from tqdm.auto import tqdm

    from guardrail.budget.checks import answer_costs, cost_query
    from guardrail.runtime.forward import Sampling

    records = read_requests(args.input, responses=True)  # validate before loading anything
    guard = _guard(args, Sampling(), start=False)  # nothing is generated: never started
    try:
        worker = guard.worker
        # The request the guard would build for each row: its budget (the policy's; a refusal
        # text over it is a policy error, as when serving) and the chat the cost model reads.
        requests = [guard.request(r["prompt"], tenant=args.tenant) for r in records]
        lines: list[str] = []
        over = 0
        step = 32  # rows per cost call: bounded memory, a moving progress bar
        with tqdm(total=len(records), desc="scores", unit="row", disable=args.quiet) as bar:
            for start in range(0, len(records), step):
                rows, asked = records[start : start + step], requests[start : start + step]
                costs = answer_costs(
                    worker.scorers.cost,
                    [cost_query(request.chat) for request in asked],
                    [r["response"] for r in rows],
                    tokenizer=worker.lm.tokenizer,
                    chunk_tokens=worker.chunk_tokens,
                )
                for record, request, cost in zip(rows, asked, costs, strict=True):
                    assert request.budget is not None  # guarded, with a cost model: always set
                    budget = float(request.budget)
                    row = {**record, "cost": cost, "budget": budget, "over_budget": cost > budget}
                    lines.append(json.dumps(row) + "\n")
                    over += cost > budget
                bar.update(len(rows))
    finally:
        guard.close()
    _write_atomically(Path(args.out), lines)
    print(f"wrote {len(lines)} scores to {args.out} ({over} over budget)", file=sys.stderr)
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
    if args.harmful or args.harmless or args.aligned_model:
        raise InputError("--backend ray calibrates on the shipped data only")
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
