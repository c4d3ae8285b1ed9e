"""Evaluation: image-quality metrics and model evaluations."""
