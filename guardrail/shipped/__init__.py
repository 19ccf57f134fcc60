"""Calibration artifacts shipped for the embedded default (see `guardrail.calibrate.shipped`)."""
