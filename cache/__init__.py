"""Artifact and score caches, installed as `guardrail.cache`.

Values are safetensors or JSON with a checksum, never pickle. Each cache has memory, disk
and Redis backends behind one interface; Redis outages read as misses, never as errors.
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
    score_key,
)

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
    "TieredStore",
    "score_key",
]
