"""guardrail: an inference-time safety guardrail for LLMs.

The InferAligner harmful-intent gate and activation steering, read from and applied to the
model's own hidden states, on a shared model worker.
"""

__version__ = "0.1.0"
