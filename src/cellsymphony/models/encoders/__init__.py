"""Morphology and expression encoders and their weight loading (imported lazily: these modules import torch)."""
