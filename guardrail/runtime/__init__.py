"""How the model runs: loading (the embedded default too), the chat template, removable
hooks, and the forward passes (prefill, decode steps, per-row KV caches). No safety logic.
"""
