"""Calibration: the TMPDiff per-step precision schedule search, its baselines and validation."""
