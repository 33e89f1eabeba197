"""lmx: a JAX/Flax research library for efficient reasoning (models, decoding, training, data)."""

from lmx import data, decoding, models, train

__all__ = ["data", "decoding", "models", "train"]
