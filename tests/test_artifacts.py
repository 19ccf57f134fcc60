"""The local artifact store: round trip, atomic writes, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from guardrail.cache.artifacts import MANIFEST, TENSORS, Artifacts, DirectoryStore


def _artifacts() -> Artifacts:
    return Artifacts({"a": torch.randn(3, 4), "b": torch.arange(5)}, {"note": "x", "n": 3})


def test_round_trip(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    original = _artifacts()
    store.save("k1", original)
    loaded = store.load("k1")
    assert loaded is not None
    assert loaded.manifest["note"] == "x" and loaded.manifest["n"] == 3
    for name, tensor in original.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]  # no staging leftovers


def test_missing_key_is_none(tmp_path: Path) -> None:
    assert DirectoryStore(tmp_path).load("absent") is None


def test_tampered_tensors_are_ignored(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.save("k", _artifacts())
    blob = bytearray((tmp_path / "k" / TENSORS).read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "k" / TENSORS).write_bytes(bytes(blob))
    assert store.load("k") is None


def test_corrupt_manifest_is_ignored(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.save("k", _artifacts())
    (tmp_path / "k" / MANIFEST).write_text("{not json")
    assert store.load("k") is None


def test_values_are_safetensors_and_json(tmp_path: Path) -> None:
    DirectoryStore(tmp_path).save("k", _artifacts())
    assert (tmp_path / "k" / TENSORS).read_bytes()[8:9] == b"{"  # safetensors header
    assert "tensors_sha256" in json.loads((tmp_path / "k" / MANIFEST).read_text())
