"""Calibrate once, then reuse: artifact keys, the default store, and what a worker loads.

Keys carry the model fingerprint, the data hashes and the schema version, so artifacts never
cross any of them; a worker on a warm store (a folder, or Redis) loads instead of calibrating.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

from guardrail.budget.artifact import CALIBRATED_COSTS, SAFETY_SCHEMA, SafetyModels
from guardrail.budget.scoring import CachedCost, ClassifierCost, ProxyReward
from guardrail.budget.search import Scorers
from guardrail.cache.artifacts import ArtifactStore, DirectoryStore, RedisStore, TieredStore
from guardrail.cache.redis_backend import redis_url_from_env
from guardrail.cache.scores import MemoryScores, RedisScores, ScoreCache, TieredScores
from guardrail.cache.signing import signer_for_redis
from guardrail.calibrate import datasets, labelled
from guardrail.calibrate.gate import CalibrationConfig, calibrate, config_contexts, config_templates
from guardrail.calibrate.safety import SafetyConfig, calibrate_safety
from guardrail.calibrate.shipped import ShippedStore
from guardrail.calibrate.token_read import extra_templates
from guardrail.errors import CalibrationError
from guardrail.gate.artifact import SCHEMA_VERSION, Calibration
from guardrail.runtime.embedder import Embedder
from guardrail.runtime.model import LanguageModel
from guardrail.runtime.paths import cache_root

log = logging.getLogger(__name__)


# Settings added after schema v3, with the value that reproduces calibrations made before
# them: at that value they stay out of the key, so those calibrations (the shipped one among
# them) keep their keys.
_SINCE_V3: dict[str, object] = {
    "suffix_share": 0.0,
    "suffix_words": 0.0,
    "context_copies": True,
    "token_layers": (),
    "token_l2": (0.01,),
}
_UNSET = object()


def artifact_key(lm: LanguageModel, config: CalibrationConfig) -> str:
    """Model fingerprint, data hashes and schema version: artifacts never cross any of them."""
    templates = config_templates(config)
    # The data by content, not by path: the same data installed elsewhere maps to one key.
    data_fields = ("harmful", "harmless", "templates", "contexts")
    settings = {
        k: v
        for k, v in asdict(config).items()
        if k not in data_fields and _SINCE_V3.get(k, _UNSET) != v
    }
    data = datasets.content_hash(
        [
            *datasets.load_many(config.harmful),
            "\x00",
            *datasets.load_many(config.harmless),
            "\x00",
            *templates,
            "\x00",
            *(json.dumps(c) for c in config_contexts(config)),
            "\x00",
            *([*extra_templates(), "\x00"] if config.token_layers else []),
            repr(sorted(settings.items())),
        ]
    )
    return f"{lm.fingerprint}-{data}-v{SCHEMA_VERSION}"


def default_store(redis_url: str | None = None, shared_key: bytes | None = None) -> TieredStore:
    """The local artifact folder, then Redis when `redis_url` or `GUARDRAIL_REDIS_URL` names
    one and the operator's shared key is set (`shared_key`, else the environment's, see
    `guardrail.cache.signing`), then the calibration shipped for the embedded default
    (`shipped`, read-only). Calibration writes to the first two, and a worker on a warm Redis
    reads from it. Without the key Redis is not used (warned once)."""
    stores: list[ArtifactStore] = [DirectoryStore(cache_root() / "artifacts")]
    url = redis_url or redis_url_from_env()
    signer = signer_for_redis(url, shared_key)
    if url is not None and signer is not None:
        stores.append(RedisStore(url, signer=signer))
    return TieredStore([*stores, ShippedStore()])


def score_cache(redis_url: str | None = None, shared_key: bytes | None = None) -> ScoreCache:
    """Memory (bounded), in front of Redis when a URL and the shared key are set, as for
    `default_store`."""
    url = redis_url or redis_url_from_env()
    signer = signer_for_redis(url, shared_key)
    if url is None or signer is None:
        return MemoryScores()
    return TieredScores([MemoryScores(), RedisScores(url, signer=signer)])


def load_or_calibrate(
    lm: LanguageModel,
    config: CalibrationConfig | None = None,
    *,
    store: ArtifactStore | None = None,
    force: bool = False,
    progress: bool = True,
) -> Calibration:
    """Reuse stored artifacts for this model and data, or calibrate and store them."""
    config = config or CalibrationConfig()
    store = store or default_store()
    key = artifact_key(lm, config)
    if not force and (found := store.load(key)) is not None:
        try:
            return Calibration.from_artifacts(found)
        except CalibrationError as exc:
            log.warning("recalibrating: %s", exc)
    calibration = calibrate(lm, config, progress=progress)
    store.save(key, calibration.to_artifacts())
    return calibration


def safety_key(lm: LanguageModel, calibration: Calibration, config: SafetyConfig) -> str:
    """Model, calibration (its steering shapes the rollouts), data, settings and schema."""
    parts = [
        lm.fingerprint,
        json.dumps(calibration.steering.as_dict() if calibration.steering else None),
        json.dumps(asdict(config), sort_keys=True, default=list),
        datasets.content_hash(
            [
                *datasets.load_many([str(p) for p in datasets.default_harmful()]),
                *datasets.load_many([str(p) for p in datasets.default_harmless()]),
            ]
        ),
        hashlib.sha256(labelled.SHIPPED.read_bytes()).hexdigest(),
    ]
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
    return f"{lm.fingerprint}-safety-{digest}-v{SAFETY_SCHEMA}"


def load_or_calibrate_safety(
    lm: LanguageModel,
    calibration: Calibration,
    config: SafetyConfig | None = None,
    *,
    store: ArtifactStore | None = None,
    force: bool = False,
    progress: bool = True,
) -> SafetyModels:
    config = config or SafetyConfig()
    store = store or default_store()
    key = safety_key(lm, calibration, config)
    if not force and (found := store.load(key)) is not None:
        try:
            return SafetyModels.from_artifacts(found)
        except CalibrationError as exc:
            log.warning("recalibrating the cost model and critic: %s", exc)
    models = calibrate_safety(lm, calibration, config, progress=progress)
    store.save(key, models.to_artifacts())
    return models


def load_scorers(
    lm: LanguageModel,
    calibration: Calibration,
    *,
    redis_url: str | None = None,
    cost_model: str | None = None,
    progress: bool = False,
    shared_key: bytes | None = None,
) -> Scorers:
    """The cost model (its scores cached in memory, and shared through Redis when a URL is
    set or in `GUARDRAIL_REDIS_URL` and the shared key is set: `score_cache`), the proxy
    reward and the critic for a worker.

    `cost_model`: None for the calibrated default (the MiniLM probe), `latent` or `minilm`
    for either calibrated probe; else a transformers sequence-classification model id or
    path, optionally `:INDEX` (the output read as the cost, default 0). The critic learned
    the default's cost scale, so with another cost model the search ranks candidates by
    reward and cost instead."""
    url = redis_url or redis_url_from_env()
    cache = score_cache(url, shared_key)
    if cost_model is not None and cost_model not in CALIBRATED_COSTS:
        source, _, index = cost_model.rpartition(":")
        if not index.lstrip("-").isdigit():  # no `:INDEX` (or a path with a colon)
            source, index = cost_model, "0"
        cost = ClassifierCost(source, int(index), 1.0, 0.0)
        return Scorers(CachedCost(cost, cache), ProxyReward(Embedder(), lm), critic=None)
    store = default_store(url, shared_key)
    models = load_or_calibrate_safety(lm, calibration, store=store, progress=progress)
    return models.scorers(lm, cache=cache, cost=cost_model)


__all__ = [
    "artifact_key",
    "default_store",
    "load_or_calibrate",
    "load_or_calibrate_safety",
    "load_scorers",
    "safety_key",
    "score_cache",
]
