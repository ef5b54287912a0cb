"""Evaluation: classifier-based quality, image metrics, grids and reports."""
