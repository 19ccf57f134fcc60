"""What a request gets: the decision record, the answer, and what a fired prompt gets.

One room for the decision every front end reports (`Decision`, `Answer`) and the one rule for
a prompt that fires the gate (`fired_steering`: steer, and with what, or refuse): the worker
applies it; the CLI only checks a flag against it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from guardrail.gate.artifact import Calibration, SteeringSetting

OnFire = Literal["auto", "steer", "refuse"]


DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass
class Decision:
    """What the guard decided for one request; serialised as the `guard` object of a record."""

    guarded: bool
    gate_score: float | None
    threshold: float | None
    fired: bool
    path: str  # "plain" | "steered" | "search" | "refused" | "timeout" | "unguarded"
    gate_layers: list[int] | None = None
    steering: dict[str, Any] | None = None
    new_tokens: int = 0
    prompt_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: str = ""
    tenant: str | None = None
    reason: str | None = None  # why a row left its path early, e.g. "over_budget"
    cost: float | None = None  # the returned text's cost under the tenant's cost model
    budget: float | None = None  # the tenant's safety budget (None: no cost check)
    candidates: int = 0  # candidates the search scored
    rounds: int = 0  # search rounds, resampled ones included
    search_tokens: int = 0  # tokens the search sampled (its compute beside `new_tokens`)
    # The probability that the answer's first token is the request's `probe` (e.g. the opening
    # of a tool call), read from the prefill logits; None: no probe asked.
    first_token_prob: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Answer:
    text: str
    decision: Decision


def fired_steering(
    calibration: Calibration | None,
    on_fire: OnFire,
    steering: SteeringSetting | None = None,
) -> SteeringSetting | None:
    """What a row that fires the gate gets: the steering setting it is answered with, or None
    for the refusal text. The one place this is decided; the worker applies it.

    `steering` is the tenant's own setting (None: the calibrated one). `auto` steers only if
    calibration met the refusal target; `steer` with no setting at all is a `ValueError`.
    """
    if on_fire not in ("auto", "steer", "refuse"):
        raise ValueError(f"on_fire must be auto, steer or refuse, got {on_fire!r}")
    setting = steering or (calibration.steering if calibration else None)
    if on_fire == "refuse":
        return None
    if on_fire == "steer":
        if setting is None:
            raise ValueError("on_fire='steer' needs a calibrated steering setting")
        return setting
    meets = calibration is not None and calibration.steering_meets_target
    return setting if meets else None


__all__ = ["DEFAULT_REFUSAL", "Answer", "Decision", "OnFire", "fired_steering"]
