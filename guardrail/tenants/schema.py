"""Tenant policies: a pydantic schema, YAML files with `extends:`, errors that name file and line.

One YAML file per tenant; a file may `extends:` another file of the same folder (by name,
with or without `.yaml`) or `default`, the policy shipped in `guardrail.policies`. Mappings
merge key by key (the child wins); lists and scalars replace. Unknown keys are errors.

    policies = load_policies("policies/")      # {tenant: Policy}; PolicyError lists problems
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from guardrail.errors import GuardrailError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatePolicy(_Strict):
    target_fpr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="share of harmless prompts allowed to fire, set on calibration's held-aside "
        "harmless prompts; null: the calibrated target (1%)",
    )
    threshold: float | None = Field(
        None, description="explicit gate threshold; null: from target_fpr or calibration"
    )

    @model_validator(mode="after")
    def _one_of(self) -> GatePolicy:
        if self.target_fpr is not None and self.threshold is not None:
            raise ValueError("give gate.target_fpr or gate.threshold, not both")
        return self


class SteeringPolicy(_Strict):
    source: Literal["auto", "srv", "refusal", "aligned"] = "auto"
    layers: list[int] | Literal["auto"] = "auto"
    strength: float | Literal["auto"] = "auto"


class SearchPolicy(_Strict):
    """InferenceGuard: what an answer whose next chunk would go over budget gets."""

    enabled: bool = Field(True, description="false: the refusal text instead of a search")
    width: int = Field(
        24, ge=1, le=1024, description="tokens per round (costs: at every stream chunk)"
    )
    samples: int = Field(6, ge=1, le=512, description="continuations sampled per beam")
    beams: int = Field(4, ge=1, le=64, description="beams kept (K)")
    rounds: int = Field(8, ge=1, le=1024, description="rounds, resampled ones included")
    critic: bool = Field(True, description="rank by the latent critic (else reward and cost)")
    penalty: float = Field(5.0, ge=0, description="logit penalty on over-budget tokens")
    temperature: float = Field(0.8, gt=0, le=10, description="sampling temperature")


class GenerationPolicy(_Strict):
    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)


class LimitsPolicy(_Strict):
    requests_per_second: float | None = Field(None, gt=0, description="null: unlimited")
    burst: int = Field(1, ge=1)
    max_input_tokens: int = Field(4096, ge=1)
    timeout: float | None = Field(120.0, gt=0, description="seconds; then the refusal text")


class Policy(_Strict):
    """What one tenant gets. `guardrail policy schema` prints this as JSON Schema."""

    tenant: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "embedded"
    budget: float = Field(
        5.0,
        ge=0,
        description="safety budget d: no answer whose cost exceeds it is returned. The default "
        "cost model gives 10 x P(unsafe), calibrated so that 5 is its operating point",
    )
    cost_model: Literal["latent", "minilm"] | None = Field(
        None,
        description="the calibrated cost model this tenant's budget applies to: latent (a probe "
        "on the model's own states over prompt and answer) or minilm (a probe on MiniLM "
        "embeddings of the answer); null: the worker's default",
    )
    on_fire: Literal["auto", "steer", "refuse"] = "auto"
    gate: GatePolicy = GatePolicy()
    steering: SteeringPolicy = SteeringPolicy()
    search: SearchPolicy = SearchPolicy()
    generation: GenerationPolicy = GenerationPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    refusal_text: str = Field(min_length=1)
    fail_mode: Literal["refuse", "error"] = "refuse"
    allow_unguarded: bool = False

    @field_validator("refusal_text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class PolicyError(GuardrailError):
    """One or more policy files are invalid; `problems` lists each (file, line, field)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def default_policy_file() -> Path:
    return Path(str(importlib.resources.files("guardrail.policies") / "default.yaml"))


def _read(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """The mapping in `path` and its node tree (for line numbers)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([Problem(str(path), None, "", "no such file")]) from None
    except OSError as exc:
        raise PolicyError([Problem(str(path), None, "", f"cannot read: {exc}")]) from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([Problem(str(path), line, "", f"invalid YAML: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([Problem(str(path), 1, "", "must be a mapping of fields")])
    return data, node


def _line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line of the deepest YAML node along a pydantic error location."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == str(key)), None)
            if found is None:
                return line
            line, node = found.start_mark.line + 1, found
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], yaml.Node | None]:
    """The file's fields merged over everything it extends; cycles are errors."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise PolicyError([Problem(str(chain[0]), None, "extends", f"cyclic extends: {cycle}")])
    data, node = _read(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, node
    if not isinstance(parent, str) or not parent:
        line = _line(node, ("extends",))
        raise PolicyError([Problem(str(path), line, "extends", "must be a file or tenant name")])
    target = path.parent / (parent if parent.endswith((".yaml", ".yml")) else f"{parent}.yaml")
    if not target.is_file() and parent in ("default", "default.yaml"):
        target = default_policy_file()
    if not target.is_file():
        line = _line(node, ("extends",))
        raise PolicyError([Problem(str(path), line, "extends", f"no policy file {target}")])
    base, _ = _resolve(target, (*chain, path))
    base.pop("tenant", None)  # a tenant id is never inherited
    return _merge(base, data), node


def load_policy(path: str | Path) -> Policy:
    """One file, with what it extends; the tenant defaults to the file's stem."""
    path = Path(path)
    data, node = _resolve(path)
    data.setdefault("tenant", path.stem)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(
            Problem(
                str(path),
                _line(node, tuple(error["loc"])),
                ".".join(str(part) for part in error["loc"]),
                _message(error),
            )
            for error in exc.errors()
        ) from None


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    return f"{error['msg']} (got {error['input']!r})"


def policy_files(directory: str | Path) -> list[Path]:
    folder = Path(directory)
    if not folder.is_dir():
        raise PolicyError([Problem(str(folder), None, "", "no such policy folder")])
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_policies(directory: str | Path) -> dict[str, Policy]:
    """Every file in `directory`, all or nothing: any problem raises one `PolicyError`."""
    policies, problems = check_policies(directory)
    if problems:
        raise PolicyError(problems)
    return policies


def check_policies(directory: str | Path) -> tuple[dict[str, Policy], list[Problem]]:
    """The valid policies by tenant, and the problems of the rest (duplicate tenants too)."""
    policies: dict[str, Policy] = {}
    origin: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in policy_files(directory):
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        if policy.tenant in policies:
            problems.append(
                Problem(
                    str(path), None, "tenant", f"{policy.tenant!r} is also {origin[policy.tenant]}"
                )
            )
            continue
        policies[policy.tenant] = policy
        origin[policy.tenant] = path
    return policies, problems


def default_policy() -> Policy:
    return load_policy(default_policy_file())


__all__ = [
    "Policy",
    "PolicyError",
    "Problem",
    "check_policies",
    "default_policy",
    "load_policies",
    "load_policy",
]
