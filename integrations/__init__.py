"""Adapters to frameworks (LangChain first), installed as `guardrail.integrations`."""
