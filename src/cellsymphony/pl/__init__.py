"""Plots, scanpy-style: each returns its Axes or Figure and takes ``show=`` and ``save=``."""

from __future__ import annotations

__all__: list[str] = []
