"""The calibration that ships for the embedded default, so a fresh machine answers at once.

Calibrating SmolLM2-135M-Instruct on the shipped data takes about 35 minutes on two cores,
and every newcomer would compute the same result. Its artifacts (gate probe, SRVs, steering
vectors, cost models, critic, manifests) ship in `guardrail/shipped/`, one folder per artifact
key, with `index.json` listing each file's SHA-256. The key carries the model fingerprint, the
data hashes and the schema, so a shipped artifact is only ever found for exactly the model and
data it was computed for; any other model calibrates on first use as before.

`ShippedStore` is read-only and sits last in `default_store`: the local folder and Redis (a
`guardrail calibrate --force` result) win over it. A file whose checksum does not match the
index is ignored (logged), and the guard calibrates instead of trusting it.

Maintainers refresh the shipped files after a change to calibration with `guardrail calibrate
--force` then `python -m guardrail.calibrate.ship`; the reproduction test
(`tests/test_shipped.py`) checks that a fresh calibration makes the same decisions.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import shutil
from pathlib import Path

from guardrail.cache.artifacts import MANIFEST, TENSORS, Artifacts, DirectoryStore

log = logging.getLogger(__name__)

INDEX = "index.json"
FILES = (MANIFEST, TENSORS)


def shipped_root() -> Path:
    """The `guardrail.shipped` package folder, wherever the package is installed."""
    return Path(str(importlib.resources.files("guardrail.shipped")))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ShippedStore:
    """Artifacts shipped with the package, each file checked against `index.json` on load."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or shipped_root()

    def index(self) -> dict[str, dict[str, str]]:
        try:
            index = json.loads((self.root / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def keys(self) -> list[str]:
        return sorted(self.index())

    def load(self, key: str) -> Artifacts | None:
        expected = self.index().get(key)
        if expected is None:
            return None
        folder = self.root / key
        for name in FILES:
            try:
                actual = _sha256(folder / name)
            except OSError as exc:
                log.warning("ignoring shipped calibration %s: %s", key, exc)
                return None
            if actual != expected.get(name):
                log.warning(
                    "ignoring shipped calibration %s: %s does not match its checksum in %s "
                    "(altered or damaged); calibrating instead",
                    key,
                    folder / name,
                    self.root / INDEX,
                )
                return None
        return DirectoryStore(self.root).load(key)

    def save(self, key: str, artifacts: Artifacts) -> None:
        """Read-only: calibrations go to the local folder and Redis, never into the package."""


def write_shipped(items: dict[str, Artifacts], root: Path | None = None) -> Path:
    """Replace the shipped artifacts with `items` (key -> artifacts) and rewrite the index."""
    root = root or shipped_root()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir() and not old.name.startswith("__"):
            shutil.rmtree(old)
    folders = DirectoryStore(root)
    index = {}
    for key, artifacts in items.items():
        folders.save(key, artifacts)
        index[key] = {name: _sha256(folders.path(key) / name) for name in FILES}
    (root / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root
