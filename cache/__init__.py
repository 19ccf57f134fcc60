"""Artifact and score caches, installed as `guardrail.cache`.

Values are safetensors or JSON, never pickle. A local directory backend ships now; Redis
joins it behind the same interface.
"""

from guardrail.cache.artifacts import Artifacts, ArtifactStore, DirectoryStore

__all__ = ["ArtifactStore", "Artifacts", "DirectoryStore"]
