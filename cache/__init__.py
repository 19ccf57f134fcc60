"""Artifact and score caches, installed as `guardrail.cache`.

Values are safetensors or JSON with a checksum, never pickle; what is read back from Redis
also carries an HMAC under the operator's shared key (`signing`). Each cache has memory,
disk and Redis backends behind one interface; Redis outages, slow replies and values that
fail their check read as misses, never as errors.
"""

from guardrail.cache.artifacts import (
    Artifacts,
    ArtifactStore,
    DirectoryStore,
    MemoryStore,
    RedisStore,
    TieredStore,
)
from guardrail.cache.scores import (
    CachedScorer,
    CountingScores,
    DiskScores,
    MemoryScores,
    RedisScores,
    ScoreCache,
    TieredScores,
    score_key,
)
from guardrail.cache.signing import Signer, shared_key, signer_for_redis

__all__ = [
    "ArtifactStore",
    "Artifacts",
    "CachedScorer",
    "CountingScores",
    "DirectoryStore",
    "DiskScores",
    "MemoryScores",
    "MemoryStore",
    "RedisScores",
    "RedisStore",
    "ScoreCache",
    "Signer",
    "TieredScores",
    "TieredStore",
    "score_key",
    "shared_key",
    "signer_for_redis",
]
