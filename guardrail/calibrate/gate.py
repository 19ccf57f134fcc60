"""Calibration: measure the model and choose the gate and steering by measurement.

Data discipline: prompts fall into hash-assigned splits (see `datasets`). The probe and the
SRVs are fitted on `fit`; the gate layer and threshold are chosen on `select`; the steering
source, layer and strength are chosen on `dev`; `test` is never read here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.calibrate import datasets
from guardrail.calibrate.judge import fluency, is_refusal
from guardrail.calibrate.token_read import extra_templates, fit_token_read
from guardrail.errors import CalibrationError, ModelError
from guardrail.gate.artifact import Calibration, SteeringSetting
from guardrail.gate.readout import READS, Gate
from guardrail.gate.vectors import (
    last_token_states,
    num_layers,
    read_states,
    refusal_direction,
    safety_related_vectors,
)
from guardrail.probes import auroc, fit_probe, rates, threshold_at_fpr
from guardrail.runtime.forward import Sampling, steered_generate
from guardrail.runtime.model import Chat, LanguageModel, load_model

log = logging.getLogger(__name__)


TOKEN_LAYERS = tuple(round(layer / 30, 4) for layer in range(4, 21, 2))


@dataclass
class CalibrationConfig:
    """Inputs and search space of a calibration run; every field lands in the manifest."""

    harmful: list[str] = field(default_factory=lambda: [str(p) for p in datasets.default_harmful()])
    # Benign prompts, with requests that only sound harmful, where a gate over-refuses.
    harmless: list[str] = field(
        default_factory=lambda: [
            str(p) for p in [*datasets.default_harmless(), datasets.borderline_benign()]
        ]
    )
    # Share of prompts also seen inside a jailbreak-style wrapper (see `calibrate`): the
    # shipped templates and 8 wrapper families (never `datasets.HELD_OUT_FAMILIES`).
    templates: list[str] = field(
        default_factory=lambda: [
            str(p) for p in (datasets.default_templates(), datasets.wrapper_families())
        ]
    )
    augment: float = 0.3
    # Share of prompts also seen followed by an adversarial-looking suffix
    # (`datasets.with_suffixes`), and the share of those made of whole words and punctuation
    # rather than random tokens of the vocabulary. 0.15 of random tokens let fewer suffixed
    # harmful requests through than none; 0.2, half of them words, fewer still (README,
    # 2026-12-07).
    suffix_share: float = 0.2
    suffix_words: float = 0.5
    # Share of `fit` and `select` prompts (both classes) also seen inside a conversation
    # context: a system prompt, a tool list, an output format or earlier turns
    # (`datasets.contexts()`; never the contexts it holds out for evaluation).
    contexts: list[str] = field(default_factory=lambda: [str(datasets.contexts())])
    context_share: float = 0.3
    # Whether the wrapped and suffixed copies are also put in contexts (a long template in a
    # long context costs much to read for little more), or only the prompts as asked.
    context_copies: bool = True
    target_fpr: float = 0.01
    probe_l2: Sequence[float] = (1e-2, 1e-1)
    # Positions each probe reads (see `gate.READS`); every set is tried with every window.
    # The last token alone: with the user's last token and the mean over the message beside
    # it as well, `select` chose the last token anyway, and the gate took 4x as long to fit.
    gate_reads: Sequence[Sequence[str]] = (("last",),)
    # Layer offsets around a centre layer that one probe reads; every window is tried.
    probe_windows: Sequence[Sequence[int]] = ((-4, 0, 4), (-8, -4, 0, 4, 8))
    aligned_model: str | None = None  # a safety-aligned model of the same hidden size
    # Steering search: layers as fractions of depth, strengths as fractions of the mean
    # residual norm at that layer (norms grow ~7x through SmolLM2, so absolute units mislead).
    layer_fractions: Sequence[float] = (0.25, 0.4, 0.55)
    strength_fractions: Sequence[float] = (0.25, 0.375, 0.5, 0.75)
    refusal_target: float = 0.95
    dev_harmful: int = 24
    dev_benign: int = 8
    dev_max_new_tokens: int = 24
    # Fluency: a steered response is fluent when its mean token NLL under the unsteered model
    # stays below `max_nll` and at least `min_distinct` of its 3-grams are distinct.
    max_nll: float = 2.5
    min_distinct: float = 0.75
    min_fluent_rate: float = 0.9
    batch_size: int = 32
    # A token read beside the pooled probe (`calibrate.token_read`): its layers as fractions
    # of depth (empty: none) and the L2 strengths tried, chosen on `select`. Layers 4-20, every
    # 2nd, of SmolLM2's 30: bench/eval_gate_reads.py chose them.
    token_layers: Sequence[float] = TOKEN_LAYERS
    token_l2: Sequence[float] = (0.01,)

    @classmethod
    def jailbreak_augmented(cls, **changes: Any) -> CalibrationConfig:
        """The opt-in recipe of `guardrail calibrate --recipe jailbreak`: public harmful and
        borderline-benign sets beside the shipped ones, GPTFuzz's jailbreakchat templates and
        random-token suffixes, all three reads pooled over denser layer windows. Measured
        (README, 2026-12-06): it refuses far fewer benign requests, wrapped or not, but lets
        more harmful ones through, plain requests included, so it is not the default."""
        recipe: dict[str, Any] = {
            "harmful": [str(p) for p in datasets.jailbreak_harmful()],
            "harmless": [str(p) for p in datasets.jailbreak_harmless()],
            "templates": [
                str(p)
                for p in (
                    datasets.default_templates(),
                    datasets.wrapper_families(),
                    datasets.jailbreakchat_templates(),
                )
            ],
            "suffix_share": 0.15,
            "suffix_words": 0.0,
            "context_copies": False,
            "gate_reads": (("last", "inst", "mean"),),
            "probe_windows": ((-8, -4, 0, 4, 8), tuple(range(-8, 9, 2))),
            "probe_l2": (1e-2,),
            "token_layers": (),  # as measured (README); the token read was not tried with it
        }
        return cls(**{**recipe, **changes})

    @classmethod
    def pooled_only(cls, **changes: Any) -> CalibrationConfig:
        """The recipe of `guardrail calibrate --recipe pooled`: the default without its token
        read or suffixed copies, as shipped until 2026-12-07 (reads searched as then): a suffix
        can hide a request from it, but it calibrates faster and its prefill adds no per-token
        dot products."""
        recipe: dict[str, Any] = {
            "suffix_share": 0.0,
            "suffix_words": 0.0,
            "token_layers": (),
            "gate_reads": (("last",), ("last", "inst", "mean")),
        }
        return cls(**{**recipe, **changes})


def calibrate(
    lm: LanguageModel, config: CalibrationConfig | None = None, *, progress: bool = True
) -> Calibration:
    config = config or CalibrationConfig()
    harmful_all = datasets.load_many(config.harmful)
    harmless_all = datasets.load_many(config.harmless)
    templates = config_templates(config)
    split = {
        (kind, name): datasets.take_split(prompts, name)
        for kind, prompts in (("harmful", harmful_all), ("harmless", harmless_all))
        for name in ("fit", "select", "dev")
    }
    # Jailbreak-style wrapping and suffixes: both classes in `fit` (the probe learns the
    # request, not its wrapping) and harmful `select` (the window is chosen for robustness to
    # it). Harmless `select` stays as given: the target FPR is defined on the user's harmless
    # prompts.
    asked = {key: list(prompts) for key, prompts in split.items()}
    for (kind, name), prompts in split.items():
        if name == "fit" or (kind, name) == ("harmful", "select"):
            prompts.extend(
                datasets.wrap(prompts, templates, config.augment)
                + datasets.with_suffixes(
                    prompts, lm.tokenizer, config.suffix_share, config.suffix_words
                )
            )
    for key, prompts in split.items():
        if len(prompts) < 4:
            raise CalibrationError(
                f"too few {key[0]} prompts in the {key[1]} split ({len(prompts)})"
            )
    started = time.perf_counter()
    say = (lambda text: tqdm.write(text)) if progress else log.info

    reads = sorted({"last", *(r for rs in config.gate_reads for r in rs)}, key=READS.index)

    contexts = config_contexts(config)
    context_sizes: dict[str, int] = {}

    def groups(key: tuple[str, str]) -> dict[str, list[Chat]]:
        """The split's prompts, then a share of them (or of those as asked, without
        `context_copies`) inside contexts, grouped by context: each context's prompts are
        read together, so its turns are run once (`read_states` reuses a shared prefix)."""
        chats: list[Chat] = [[{"role": "user", "content": p}] for p in split[key]]
        grouped: dict[str, list[Chat]] = {"": chats}
        surrounded = split[key] if config.context_copies else asked[key]
        in_contexts = datasets.in_contexts(surrounded, contexts, config.context_share)
        context_sizes[f"{key[0]}/{key[1]}"] = len(in_contexts)
        for chat in in_contexts:
            grouped.setdefault(json.dumps(chat[:-1]), []).append(chat)
        return grouped

    def states(key: tuple[str, str], desc: str) -> dict[str, torch.Tensor]:
        parts = [
            read_states(
                lm,
                [lm.prompt(chat) for chat in chats],
                reads=reads,
                batch_size=config.batch_size,
                desc=desc if progress and not context else None,
            )
            for context, chats in tqdm(
                groups(key).items(), desc=f"{desc} in contexts", disable=not progress
            )
        ]
        return {read: torch.cat([part[read] for part in parts]) for read in reads}

    acts = {key: states(key, f"activations {key[0]}/{key[1]}") for key in split if key[1] != "dev"}
    gate, srv_gate, gate_search = _choose_gate(acts, config)
    chosen = {
        kind: max(rows, key=lambda r: (r["tpr"], r["auroc"])) for kind, rows in gate_search.items()
    }
    say(
        f"gate: probe on {'+'.join(gate.reads)} at layers {list(gate.layers)}"
        f" (select TPR {chosen['probe']['tpr']:.3f},"
        f" FPR {chosen['probe']['fpr']:.3f}); SRV baseline at layer {srv_gate.layers[0]}"
        f" (TPR {chosen['srv']['tpr']:.3f}, FPR {chosen['srv']['fpr']:.3f})"
    )
    harmless_scores = gate.read(acts["harmless", "select"])
    if config.token_layers:
        gate, harmless_scores, gate_search["tokens"] = fit_token_read(
            lm,
            gate,
            {kind: asked[kind, "fit"] for kind in ("harmful", "harmless")},
            {kind: list(groups((kind, "select")).values()) for kind in ("harmful", "harmless")},
            {kind: gate.read(acts[kind, "select"]) for kind in ("harmful", "harmless")},
            [*templates, *extra_templates()],
            config.token_layers,
            config.token_l2,
            config.target_fpr,
            batch_size=config.batch_size,
            progress=progress,
        )
        row = next(r for r in gate_search["tokens"] if r["chosen"])
        say(
            f"gate: and a token read at layers {row['layers']} (l2 {row['l2']}): select TPR"
            f" {row['tpr']:.3f}, FPR {row['fpr']:.3f} for either"
        )

    fit_last = acts["harmful", "fit"]["last"], acts["harmless", "fit"]["last"]
    ssvs = {"srv": _unit(safety_related_vectors(*fit_last))}
    ssvs["refusal"] = _unit(
        refusal_direction(
            lm, split["harmful", "fit"][:64], desc="refusal direction" if progress else None
        )
    )
    if config.aligned_model:
        ssvs["aligned"] = _unit(
            _aligned_srvs(config, split, num_layers(lm), lm.hidden_size, progress)
        )
    norms = torch.cat(fit_last).norm(dim=-1).mean(0)

    steering, meets, search_table = _choose_steering(lm, ssvs, norms, split, config, progress)
    if steering is None:
        say("steering: no fluent setting found; fired prompts get the refusal text")
    else:
        row = next(r for r in search_table if r["chosen"])
        say(
            f"steering: {steering.source} at layers {list(steering.layers)}, strength"
            f" {steering.strength:.1f}: dev refusal {row['refusal_rate']:.2f},"
            f" fluent {row['fluent_rate']:.2f} (target met: {meets})"
        )
    manifest: dict[str, Any] = {
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "data": {
            "harmful": {"paths": config.harmful, "hash": datasets.content_hash(harmful_all)},
            "harmless": {"paths": config.harmless, "hash": datasets.content_hash(harmless_all)},
            "templates": {"paths": config.templates, "hash": datasets.content_hash(templates)},
            "contexts": {
                "paths": config.contexts,
                "hash": datasets.content_hash([json.dumps(c) for c in contexts]),
            },
            "held_out_families": list(datasets.HELD_OUT_FAMILIES),
            "split_sizes": {f"{k}/{n}": len(p) for (k, n), p in split.items()},
            "in_contexts": context_sizes,
        },
        "config": asdict(config),
        "gate_search": gate_search,
        "residual_norms": [round(float(n), 2) for n in norms],
        "steering_search": search_table,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return Calibration(gate, srv_gate, ssvs, steering, meets, manifest, harmless_scores)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return unit


def config_templates(config: CalibrationConfig) -> list[str]:
    return [t for path in config.templates for t in datasets.load_templates(path)]


def config_contexts(config: CalibrationConfig) -> list[datasets.Context]:
    return [c for path in config.contexts for c in datasets.load_contexts(path)]


def _choose_gate(
    acts: dict[tuple[str, str], dict[str, torch.Tensor]], config: CalibrationConfig
) -> tuple[Gate, Gate, dict[str, list[dict[str, Any]]]]:
    """Fit read-outs on `fit`, set thresholds and pick reads and layers on `select`.

    Probe: one per set of reads, window of layers (a centre plus offsets) and L2 strength.
    SRV baseline: InferAligner's unit SRV at each single layer, read at the last token.
    """
    fit_h, fit_b = acts["harmful", "fit"], acts["harmless", "fit"]
    sel_h, sel_b = acts["harmful", "select"], acts["harmless", "select"]
    n_layers = fit_h["last"].shape[1]

    def measured(gate: Gate) -> tuple[Gate, dict[str, Any]]:
        gate.threshold = threshold_at_fpr(gate.read(sel_b), config.target_fpr)
        tpr, fpr = rates(gate.read(sel_h), gate.read(sel_b), gate.threshold)
        area = auroc(gate.read(sel_h), gate.read(sel_b))
        return gate, {
            "reads": list(gate.reads),
            "layers": list(gate.layers),
            "tpr": round(tpr, 4),
            "fpr": round(fpr, 4),
            "auroc": round(area, 4),
        }

    srvs = safety_related_vectors(fit_h["last"], fit_b["last"])
    srv_rows = [
        measured(Gate((layer,), srvs[layer] / srvs[layer].norm().clamp(min=1e-8), 0.0, 0.0, "srv"))
        for layer in range(n_layers)
    ]
    windows = [
        tuple(centre + offset for offset in window)
        for window in config.probe_windows
        for centre in range(-min(window), n_layers - max(window), 2)
    ] or [(layer,) for layer in range(n_layers)]  # shallow models: one layer per probe
    probe_rows = []
    for reads in config.gate_reads:
        for layers in windows:
            shape = Gate(layers, torch.zeros(0), 0.0, 0.0, "probe", tuple(reads))
            features = {
                name: shape.features({r: x[r][:, list(layers)] for r in shape.reads})
                for name, x in (("harmful", fit_h), ("harmless", fit_b))
            }
            for l2 in config.probe_l2:
                weight, bias = fit_probe(features["harmful"], features["harmless"], l2=l2)
                gate, row = measured(Gate(layers, weight, bias, 0.0, "probe", tuple(reads)))
                probe_rows.append((gate, {**row, "l2": l2}))

    def best(rows: list[tuple[Gate, dict[str, Any]]]) -> tuple[Gate, dict[str, Any]]:
        return max(rows, key=lambda r: (r[1]["tpr"], r[1]["auroc"]))

    probe, srv_gate = best(probe_rows)[0], best(srv_rows)[0]
    return probe, srv_gate, {"probe": [r for _, r in probe_rows], "srv": [r for _, r in srv_rows]}


def _aligned_srvs(
    config: CalibrationConfig,
    split: dict[tuple[str, str], list[str]],
    layers: int,
    hidden: int,
    progress: bool,
) -> torch.Tensor:
    """SRVs of a safety-aligned sibling, mapped onto the target's layers by relative depth."""
    assert config.aligned_model is not None
    aligned = load_model(config.aligned_model)
    if aligned.hidden_size != hidden:
        raise ModelError(
            f"aligned model {config.aligned_model!r} has hidden size {aligned.hidden_size}, "
            f"the target has {hidden}: SSVs cannot transfer"
        )
    per_kind = [
        last_token_states(
            aligned,
            [aligned.format_chat(p) for p in split[kind, "fit"]],
            batch_size=config.batch_size,
            desc=f"aligned model {kind}" if progress else None,
        )
        for kind in ("harmful", "harmless")
    ]
    srvs = safety_related_vectors(*per_kind)
    source_layers = srvs.shape[0]
    index = [
        min(source_layers - 1, round(i * (source_layers - 1) / max(layers - 1, 1)))
        for i in range(layers)
    ]
    return srvs[index]


def _choose_steering(
    lm: LanguageModel,
    ssvs: dict[str, torch.Tensor],
    norms: torch.Tensor,
    split: dict[tuple[str, str], list[str]],
    config: CalibrationConfig,
    progress: bool,
) -> tuple[SteeringSetting | None, bool, list[dict[str, Any]]]:
    """The mildest fluent setting that reaches the refusal target on `dev`.

    Strength rises per (source, layer) until the target is met, the text stops being fluent
    or refusals stop rising; stronger settings in that sweep are not tried. When no setting
    reaches the target, the fluent setting with the most refusals is kept, reported as short.
    """
    harmful = split["harmful", "dev"][: config.dev_harmful]
    benign = split["harmless", "dev"][: config.dev_benign]
    prompts = harmful + benign
    texts = [lm.format_chat(p) for p in prompts]
    sampling = Sampling(max_new_tokens=config.dev_max_new_tokens)
    layers = num_layers(lm)
    candidate_layers = sorted({min(layers - 1, round(f * layers)) for f in config.layer_fractions})
    sweeps = [(source, layer) for source in ssvs for layer in candidate_layers]
    table: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(sweeps) * len(config.strength_fractions),
        desc="steering search",
        disable=not progress,
    )
    for source, layer in sweeps:
        for step, fraction in enumerate(config.strength_fractions):
            bar.update(1)
            setting = SteeringSetting(source, (layer,), round(fraction * float(norms[layer]), 2))
            vectors = {layer: ssvs[source][layer]}
            tokens = steered_generate(
                lm, texts, vectors, torch.full((len(texts),), setting.strength), sampling
            )
            responses = [
                str(lm.tokenizer.decode(t, skip_special_tokens=True)).strip() for t in tokens
            ]
            scores = fluency(lm, prompts, responses)
            fluent = [s.nll <= config.max_nll and s.distinct >= config.min_distinct for s in scores]
            row = {
                **setting.as_dict(),
                "strength_fraction": fraction,
                "refusal_rate": round(
                    sum(map(is_refusal, responses[: len(harmful)])) / len(harmful), 4
                ),
                "benign_refusal_rate": round(
                    sum(map(is_refusal, responses[len(harmful) :])) / max(len(benign), 1), 4
                ),
                "fluent_rate": round(sum(fluent) / len(fluent), 4),
                "mean_nll": round(
                    sum(s.nll for s in scores if math.isfinite(s.nll)) / len(scores), 3
                ),
                "sample": responses[0][:160],
                "chosen": False,
            }
            stalled = step > 0 and row["refusal_rate"] <= table[-1]["refusal_rate"]
            table.append(row)
            if (
                row["fluent_rate"] < config.min_fluent_rate
                or row["refusal_rate"] >= config.refusal_target
                or stalled
            ):
                bar.update(len(config.strength_fractions) - 1 - step)
                break
    bar.close()
    fluent_rows = [r for r in table if r["fluent_rate"] >= config.min_fluent_rate]
    meeting = [r for r in fluent_rows if r["refusal_rate"] >= config.refusal_target]
    if meeting:
        chosen = min(meeting, key=lambda r: (r["strength_fraction"], -r["refusal_rate"]))
    elif fluent_rows:
        chosen = max(fluent_rows, key=lambda r: (r["refusal_rate"], -r["strength_fraction"]))
    else:
        return None, False, table
    chosen["chosen"] = True
    return SteeringSetting.from_dict(chosen), bool(meeting), table


__all__ = ["CalibrationConfig", "calibrate"]
