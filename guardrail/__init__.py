"""guardrail: an inference-time safety guardrail for LLMs.

The InferAligner harmful-intent gate and activation steering, read from and applied to the
model's own hidden states, on a shared model worker.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardrail.serve.guard import Guard, GuardResult
    from guardrail.tenants.store import TenantPolicy


def __getattr__(name: str) -> Any:
    """`guardrail.Guard` without importing torch on `import guardrail` (the CLI starts fast)."""
    if name in ("Guard", "GuardResult"):
        from guardrail.serve import guard

        return getattr(guard, name)
    if name == "TenantPolicy":
        from guardrail.tenants.store import TenantPolicy

        return TenantPolicy
    raise AttributeError(f"module 'guardrail' has no attribute {name!r}")


__all__ = ["Guard", "GuardResult", "TenantPolicy", "__version__"]
