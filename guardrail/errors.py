"""Errors the guard raises on purpose: each message names the thing that is wrong."""


class GuardrailError(Exception):
    """Base class; the CLI prints the message on one line and exits non-zero."""


class ModelError(GuardrailError):
    """A model cannot be loaded, or its architecture is not supported."""


class InputError(GuardrailError):
    """A request or input file is malformed (the message names file, line and field)."""


class CalibrationError(GuardrailError):
    """Calibration data or artifacts are missing, inconsistent or for another model."""


class OverloadedError(GuardrailError):
    """The worker's request queue is full: retry later or add capacity (backpressure)."""


class ShutdownError(GuardrailError):
    """The worker is shutting down or closed and does not take or finish this request."""
