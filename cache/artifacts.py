"""Calibration artifacts: named tensors (safetensors) plus a JSON manifest, under a key.

The key carries the model fingerprint, the calibration data hash and the schema version, so
artifacts are never applied to a model or data set they were not computed for. The manifest
records a checksum of the tensor file; a value that fails it is treated as missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

log = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"


@dataclass
class Artifacts:
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)


class ArtifactStore(Protocol):
    """Where calibration results live; `load` returns None when absent or damaged."""

    def load(self, key: str) -> Artifacts | None: ...

    def save(self, key: str, artifacts: Artifacts) -> None: ...


class DirectoryStore:
    """One folder per key under `root`; writes are atomic (staging folder, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> Artifacts | None:
        folder = self.path(key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            blob = (folder / TENSORS).read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable artifacts in %s: %s", folder, exc)
            return None
        if hashlib.sha256(blob).hexdigest() != manifest.get("tensors_sha256"):
            log.warning("ignoring artifacts in %s: checksum mismatch", folder)
            return None
        return Artifacts(tensors=load_tensors(blob), manifest=manifest)

    def save(self, key: str, artifacts: Artifacts) -> None:
        blob = save_tensors({k: v.contiguous() for k, v in artifacts.tensors.items()})
        manifest = {**artifacts.manifest, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        try:
            (staging / TENSORS).write_bytes(blob)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            target = self.path(key)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
