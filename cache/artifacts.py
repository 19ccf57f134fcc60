"""Calibration artifacts: named tensors (safetensors) plus a JSON manifest, under a key.

The key carries the model fingerprint, the calibration data hash and the schema version, so
artifacts are never applied to a model or data set they were not computed for. The manifest
records a checksum of the tensor file; a value that fails it is treated as missing.

Backends: `DirectoryStore` (local disk), `MemoryStore`, `RedisStore` (shared by many
workers, every value HMAC-signed with the operator's key, see `signing`); `TieredStore`
reads through them in order and writes to all, so a worker on a warm Redis starts without
calibrating and a Redis outage never fails a request.
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

from guardrail.cache.redis_backend import SafeRedis
from guardrail.cache.signing import Signer

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
            manifest = (folder / MANIFEST).read_bytes()
            blob = (folder / TENSORS).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring unreadable artifacts in %s: %s", folder, exc)
            return None
        return decode(manifest, blob, str(folder))

    def save(self, key: str, artifacts: Artifacts) -> None:
        manifest, blob = encode(artifacts)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        try:
            (staging / TENSORS).write_bytes(blob)
            (staging / MANIFEST).write_bytes(manifest)
            target = self.path(key)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def encode(artifacts: Artifacts) -> tuple[bytes, bytes]:
    """(manifest JSON, safetensors blob), the manifest carrying the blob's checksum."""
    blob = save_tensors({k: v.contiguous() for k, v in artifacts.tensors.items()})
    manifest = {**artifacts.manifest, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    return json.dumps(manifest, indent=2, sort_keys=True).encode(), blob


def decode(manifest: bytes, blob: bytes, where: str) -> Artifacts | None:
    """The artifacts, or None (logged) when the manifest or the checksum does not hold."""
    try:
        fields = json.loads(manifest)
        if not isinstance(fields, dict):
            raise ValueError("the manifest is not a JSON object")
    except ValueError as exc:
        log.warning("ignoring artifacts in %s: bad manifest: %s", where, exc)
        return None
    if hashlib.sha256(blob).hexdigest() != fields.get("tensors_sha256"):
        log.warning("ignoring artifacts in %s: checksum mismatch", where)
        return None
    return Artifacts(tensors=load_tensors(blob), manifest=fields)


class MemoryStore:
    """In-process artifacts, stored encoded so callers never share mutable tensors."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[bytes, bytes]] = {}

    def load(self, key: str) -> Artifacts | None:
        item = self._items.get(key)
        return decode(*item, f"memory:{key}") if item else None

    def save(self, key: str, artifacts: Artifacts) -> None:
        self._items[key] = encode(artifacts)


class RedisStore:
    """Artifacts as a Redis hash {manifest, tensors, hmac} under `guardrail:artifacts:KEY`.

    The HMAC (under the operator's key, `signing`) covers the key, the manifest and the
    tensors: a value written without the key, with another key, or changed since is ignored
    (logged), and the caller calibrates or reads its local folder instead. Never raises: an
    unreachable Redis reads as absent, and a save that could not reach it stays pending and
    is written on the next call that finds Redis up.
    """

    def __init__(
        self,
        url: str,
        *,
        signer: Signer,
        prefix: str = "guardrail",
        timeout: float = 0.5,
        retry_after: float = 5.0,
    ) -> None:
        self.redis = SafeRedis(url, prefix=prefix, timeout=timeout, retry_after=retry_after)
        self.signer = signer
        self.pending: dict[str, tuple[bytes, bytes]] = {}

    def load(self, key: str) -> Artifacts | None:
        self._flush()
        name = self.redis.key("artifacts", key)
        found = self.redis.call(lambda r: r.hmget(name, ["manifest", "tensors", "hmac"]))
        if not found or found[0] is None or found[1] is None:
            return None
        manifest, blob, tag = found
        if not self.signer.verify(tag, "artifacts", key, manifest, blob):
            log.warning(
                "ignoring artifacts in redis:%s: not signed with this deployment's shared key "
                "(written without it, with another key, or changed since)",
                name,
            )
            return None
        return decode(manifest, blob, f"redis:{name}")

    def save(self, key: str, artifacts: Artifacts) -> None:
        self.pending[key] = encode(artifacts)
        self._flush()

    def _flush(self) -> None:
        for key, (manifest, blob) in list(self.pending.items()):
            name = self.redis.key("artifacts", key)
            tag = self.signer.tag("artifacts", key, manifest, blob)
            mapping = {"manifest": manifest, "tensors": blob, "hmac": tag}
            if self.redis.call(lambda r, n=name, m=mapping: r.hset(n, mapping=m)) is None:
                return  # still down: keep it pending
            del self.pending[key]


class TieredStore:
    """Read through `stores` in order (a hit fills the earlier ones); write to all."""

    def __init__(self, stores: list[ArtifactStore]) -> None:
        self.stores = stores

    def load(self, key: str) -> Artifacts | None:
        for i, store in enumerate(self.stores):
            found = store.load(key)
            if found is not None:
                for earlier in self.stores[:i]:
                    earlier.save(key, found)
                return found
        return None

    def save(self, key: str, artifacts: Artifacts) -> None:
        for store in self.stores:
            store.save(key, artifacts)
