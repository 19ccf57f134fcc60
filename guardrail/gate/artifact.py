"""What calibration produces and how it is stored: gate, steering vectors, chosen setting.

Kept apart from the procedure (`calibrate.py`) so that serving loads artifacts without
pulling in the calibration code, and so the artifact layout is described in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from guardrail.cache.artifacts import Artifacts
from guardrail.errors import CalibrationError
from guardrail.gate.readout import READS, Gate, TokenRead
from guardrail.probes import threshold_at_fpr

SCHEMA_VERSION = 3  # bump when the calibration procedure or layout changes
SOURCES = ("srv", "refusal", "aligned")


@dataclass(frozen=True)
class SteeringSetting:
    """Add `strength` times the unit SSV of `source` at each of `layers`."""

    source: str
    layers: tuple[int, ...]
    strength: float

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "layers": list(self.layers), "strength": self.strength}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SteeringSetting:
        return cls(
            str(data["source"]), tuple(int(i) for i in data["layers"]), float(data["strength"])
        )


@dataclass
class Calibration:
    """The gate, the unit steering vectors per source and layer, and the chosen setting.

    `steering_meets_target` says whether the chosen setting reached the refusal target on
    the dev split; `on_fire="auto"` steers only when it did and refuses otherwise.
    """

    gate: Gate
    srv_gate: Gate  # the interpretable InferAligner baseline, reported beside the probe
    ssvs: dict[str, torch.Tensor]  # source -> [layers, hidden], unit rows
    steering: SteeringSetting | None
    steering_meets_target: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    harmless_scores: torch.Tensor | None = None  # the gate on harmless `select` prompts

    def threshold_at(self, target_fpr: float) -> float:
        """The gate threshold that lets `target_fpr` of harmless prompts fire (a tenant's own
        target), measured on the same held-aside prompts as the calibrated threshold."""
        if self.harmless_scores is None:
            raise CalibrationError(
                "these calibration artifacts carry no harmless gate scores, so a tenant's "
                "gate.target_fpr cannot be applied; recalibrate (guardrail calibrate --force)"
            )
        return threshold_at_fpr(self.harmless_scores, target_fpr)

    def steering_vectors(self, setting: SteeringSetting | None = None) -> dict[int, torch.Tensor]:
        setting = setting or self.steering
        if setting is None:
            return {}
        if setting.source not in self.ssvs:
            known = ", ".join(sorted(self.ssvs))
            raise CalibrationError(
                f"no steering vectors from source {setting.source!r} (calibrated: {known})"
            )
        depth = len(self.ssvs[setting.source])
        if bad := [layer for layer in setting.layers if not 0 <= layer < depth]:
            raise CalibrationError(f"steering layers {bad} outside the model's 0..{depth - 1}")
        return {layer: self.ssvs[setting.source][layer] for layer in setting.layers}

    def to_artifacts(self) -> Artifacts:
        tensors = {"gate.weight": self.gate.weight, "srv_gate.weight": self.srv_gate.weight}
        if self.gate.tokens is not None:
            tensors["gate.tokens.weight"] = self.gate.tokens.weight
        tensors.update({f"ssv.{k}": v for k, v in self.ssvs.items()})
        if self.harmless_scores is not None:
            tensors["gate.harmless_scores"] = self.harmless_scores
        manifest = {
            **self.manifest,
            "schema_version": SCHEMA_VERSION,
            "gate": _gate_fields(self.gate),
            "srv_gate": _gate_fields(self.srv_gate),
            "steering": self.steering.as_dict() if self.steering else None,
            "steering_meets_target": self.steering_meets_target,
        }
        return Artifacts(tensors=tensors, manifest=manifest)

    @classmethod
    def from_artifacts(cls, artifacts: Artifacts) -> Calibration:
        m, t = artifacts.manifest, artifacts.tensors
        if m.get("schema_version") != SCHEMA_VERSION:
            raise CalibrationError(
                f"artifact schema {m.get('schema_version')} != {SCHEMA_VERSION}; recalibrate"
            )
        try:
            return cls(
                gate=_gate(
                    m["gate"],
                    t["gate.weight"],
                    t["srv_gate.weight"].numel(),
                    t.get("gate.tokens.weight"),
                ),
                srv_gate=_gate(m["srv_gate"], t["srv_gate.weight"], t["srv_gate.weight"].numel()),
                ssvs={k.removeprefix("ssv."): v for k, v in t.items() if k.startswith("ssv.")},
                steering=SteeringSetting.from_dict(m["steering"]) if m["steering"] else None,
                steering_meets_target=bool(m["steering_meets_target"]),
                manifest=m,
                harmless_scores=t.get("gate.harmless_scores"),
            )
        except (KeyError, TypeError) as exc:
            raise CalibrationError(f"incomplete calibration artifacts: missing {exc}") from exc


def _gate_fields(gate: Gate) -> dict[str, Any]:
    fields = {
        "layers": list(gate.layers),
        "reads": list(gate.reads),
        "bias": gate.bias,
        "threshold": gate.threshold,
        "kind": gate.kind,
    }
    if gate.tokens is not None:
        tokens = gate.tokens
        fields["tokens"] = {
            "layers": list(tokens.layers),
            "bias": tokens.bias,
            "shift": tokens.shift,
        }
    return fields


def _gate(
    fields: dict[str, Any],
    weight: torch.Tensor,
    hidden: int,
    token_weight: torch.Tensor | None = None,
) -> Gate:
    tokens = None
    if "tokens" in fields:
        if token_weight is None:
            raise CalibrationError("the gate's token read has no weight (gate.tokens.weight)")
        part = fields["tokens"]
        tokens = TokenRead(
            tuple(int(i) for i in part["layers"]),
            token_weight,
            float(part["bias"]),
            float(part["shift"]),
        )
        if token_weight.shape != (len(tokens.layers) * hidden,):
            raise CalibrationError(
                f"gate token weight of shape {tuple(token_weight.shape)} does not fit"
                f" {len(tokens.layers)} layers x hidden size {hidden}"
            )
    gate = Gate(
        layers=tuple(fields["layers"]),
        weight=weight,
        bias=float(fields["bias"]),
        threshold=float(fields["threshold"]),
        kind=str(fields["kind"]),
        reads=tuple(fields["reads"]),
        tokens=tokens,
    )
    if unknown := set(gate.reads) - set(READS):
        raise CalibrationError(f"gate reads {sorted(unknown)} unknown; known: {list(READS)}")
    if weight.shape != (len(gate.reads) * len(gate.layers) * hidden,):
        raise CalibrationError(
            f"gate weight of shape {tuple(weight.shape)} does not fit {len(gate.reads)} reads"
            f" x {len(gate.layers)} layers x hidden size {hidden}"
        )
    return gate
