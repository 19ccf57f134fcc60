"""The shipped calibration of the embedded default: found by key, checked by checksum, and
reproduced by a fresh calibration (same decisions, figures within stated tolerances).

The reproduction test calibrates from scratch (about 35 minutes on two cores): it is the one
test in the suite that does.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.budget.artifact import SafetyModels
from guardrail.budget.checks import answer_costs
from guardrail.cache.artifacts import TENSORS, MemoryStore
from guardrail.calibrate import datasets, labelled
from guardrail.calibrate.gate import CalibrationConfig
from guardrail.calibrate.safety import SafetyConfig
from guardrail.calibrate.shipped import INDEX, ShippedStore, write_shipped
from guardrail.calibrate.store import (
    artifact_key,
    load_or_calibrate,
    load_or_calibrate_safety,
    safety_key,
)
from guardrail.gate.artifact import Calibration
from guardrail.gate.vectors import gate_scores

# Tolerances between the shipped calibration and a fresh one (same code, same data). Float
# sums differ in their last bits between CPUs and thread counts; everything else must match.
NEAR_THRESHOLD = 0.05  # in units of the gate scores' std: a prompt this close may flip
TOLERANCE = 0.02  # calibration figures that are rates (TPR, FPR, refusal, AUROC)
COST_TOLERANCE = 0.05  # absolute, on the cost scale (budget 5)
BUDGET = 5.0


def shipped_pair(lm: Any) -> tuple[Calibration, SafetyModels]:
    store = ShippedStore()
    gate = store.load(artifact_key(lm, CalibrationConfig()))
    assert gate is not None, f"no shipped gate calibration for this model and data: {store.keys()}"
    calibration = Calibration.from_artifacts(gate)
    safety = store.load(safety_key(lm, calibration, SafetyConfig()))
    assert safety is not None, "no shipped cost model and critic for the shipped gate"
    return calibration, SafetyModels.from_artifacts(safety)


def gate_prompts() -> list[str]:
    """A fixed prompt set calibration never fitted on: the `test` split of the shipped data."""
    harmful = datasets.take_split(datasets.load_many(datasets.default_harmful()), "test")
    harmless = datasets.take_split(datasets.load_many(datasets.default_harmless()), "test")
    borderline = datasets.take_split(datasets.load_prompts(datasets.borderline_benign()), "test")
    return harmful[:60] + harmless[:60] + borderline[:30]


def cost_answers() -> list[labelled.Labelled]:
    """A fixed sample of the shipped human-labelled answers, safe and unsafe."""
    return labelled.shipped("select")[::16]


def gate_differences(lm: Any, old: Calibration, new: Calibration) -> list[str]:
    """Every way the gate and steering of `new` depart from `old` beyond the tolerances."""
    found = []
    for name in ("kind", "layers", "reads"):
        if getattr(old.gate, name) != getattr(new.gate, name):
            found.append(f"gate {name}: {getattr(old.gate, name)} -> {getattr(new.gate, name)}")
    layers = [c.gate.tokens.layers if c.gate.tokens else None for c in (old, new)]
    if layers[0] != layers[1]:
        found.append(f"gate token read layers: {layers[0]} -> {layers[1]}")
    if (old.steering, old.steering_meets_target) != (new.steering, new.steering_meets_target):
        found.append(f"steering: {old.steering} -> {new.steering}")
    prompts = gate_prompts()
    before = gate_scores(lm, old.gate, prompts)
    after = gate_scores(lm, new.gate, prompts) if not found else before
    margin = NEAR_THRESHOLD * float(before.std())
    clear = (before - old.gate.threshold).abs() > margin
    flipped = (before > old.gate.threshold) != (after > new.gate.threshold)
    if bool((flipped & clear).any()):
        found.append(f"gate decisions differ on {int((flipped & clear).sum())} prompts")
    figures = [
        *_rates(old.manifest, new.manifest, "gate_search"),
        *_rates(old.manifest, new.manifest, "steering_search"),
    ]
    return found + [f"{n}: {a:.3f} -> {b:.3f}" for n, a, b in figures if abs(a - b) > TOLERANCE]


def cost_differences(lm: Any, old_safety: SafetyModels, new_safety: SafetyModels) -> list[str]:
    """Every way the cost models of `new_safety` depart from `old_safety`'s."""
    figures = _rates(old_safety.manifest, new_safety.manifest, "report")
    found = [f"{n}: {a:.3f} -> {b:.3f}" for n, a, b in figures if abs(a - b) > TOLERANCE]
    answers = cost_answers()
    for which in ("minilm", "latent"):
        costs = [
            torch.tensor(
                answer_costs(
                    models.cost(lm, which),
                    [a.prompt for a in answers],
                    [a.response for a in answers],
                    tokenizer=lm.tokenizer,
                )
            )
            for models in (old_safety, new_safety)
        ]
        gap = float((costs[0] - costs[1]).abs().max())
        if gap > COST_TOLERANCE:
            found.append(f"{which} cost: largest difference {gap:.3f} on the labelled sample")
        over = [c > BUDGET for c in costs]
        near = (costs[0] - BUDGET).abs() <= COST_TOLERANCE
        if bool(((over[0] != over[1]) & ~near).any()):
            found.append(f"{which} over-budget decisions differ")
    return found


def _rates(old: dict[str, Any], new: dict[str, Any], part: str) -> list[tuple[str, float, float]]:
    """The figures in [0, 1] (rates, AUROCs) of one manifest part, paired by dotted name."""

    def flat(value: Any, prefix: str) -> dict[str, float]:
        if isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            out: dict[str, float] = {}
            for k, v in items:
                out.update(flat(v, f"{prefix}.{k}"))
            return out
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            return {prefix: value}
        return {}

    a, b = flat(old.get(part), part), flat(new.get(part), part)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys())]


def test_shipped_calibration_is_found_for_the_embedded_default(lm: Any) -> None:
    calibration, safety = shipped_pair(lm)
    assert calibration.steering is not None and safety.latent_weight is not None


def test_an_altered_shipped_file_is_refused(
    lm: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ShippedStore()
    key = artifact_key(lm, CalibrationConfig())
    copy = tmp_path / "shipped"
    shutil.copytree(store.root, copy)
    assert ShippedStore(copy).load(key) is not None
    tensors = copy / key / TENSORS
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 1
    tensors.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="guardrail.calibrate.shipped"):
        assert ShippedStore(copy).load(key) is None
    assert "does not match its checksum" in caplog.text and INDEX in caplog.text


def test_the_comparison_catches_a_changed_gate(lm: Any, tmp_path: Path) -> None:
    """An artifact altered and re-indexed (so checksums pass) still fails the reproduction."""
    calibration, _ = shipped_pair(lm)
    artifacts = calibration.to_artifacts()
    artifacts.manifest["gate"]["threshold"] -= 0.5 * float(
        gate_scores(lm, calibration.gate, gate_prompts()).std()
    )
    write_shipped({artifact_key(lm, CalibrationConfig()): artifacts}, tmp_path)
    found = ShippedStore(tmp_path).load(artifact_key(lm, CalibrationConfig()))
    assert found is not None
    altered = Calibration.from_artifacts(found)
    found_now = gate_differences(lm, altered, calibration)
    assert any("gate decisions differ" in d for d in found_now), found_now
    assert gate_differences(lm, calibration, calibration) == []


def test_a_fresh_calibration_reproduces_the_shipped_one(lm: Any) -> None:
    store = MemoryStore()
    fresh = load_or_calibrate(lm, store=store, force=True, progress=False)
    fresh_safety = load_or_calibrate_safety(lm, fresh, store=store, force=True, progress=False)
    calibration, safety = shipped_pair(lm)
    found = gate_differences(lm, calibration, fresh)
    assert found == [], found  # the cost models are keyed by the steering: compare them after
    assert cost_differences(lm, safety, fresh_safety) == []
