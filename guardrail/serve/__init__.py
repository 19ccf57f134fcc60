"""Serving: the model worker and its scheduler, the async `Guard`, the OpenAI-compatible HTTP
front, Ray Serve replicas, metrics and tracing.
"""
