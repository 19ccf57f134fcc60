"""Where things live on disk: the guard's cache folder and files shipped inside packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from guardrail.errors import ModelError


def cache_root() -> Path:
    """Where converted models and calibration artifacts live (`GUARDRAIL_HOME` overrides)."""
    if home := os.environ.get("GUARDRAIL_HOME"):
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "guardrail"


def package_file(package: str, relative: str, hint: str) -> Path:
    """A file shipped inside an installed package, found without importing the package (these
    import heavy dependencies we do not install); errors say how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"needs the package {package.replace('_', '-')}: {hint}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with {hint}")
    return path


__all__ = ["cache_root", "package_file"]
