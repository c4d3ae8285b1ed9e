"""Checkpoint formats and atomic file writing."""
