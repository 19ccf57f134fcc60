"""Declarative tenant policy files (YAML), shipped as package data."""
