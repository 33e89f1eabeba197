"""lmx: a JAX/Flax research library for efficient reasoning (models, kernels, decoding, training, data).

`import lmx` gives lmx.models, lmx.pallas, lmx.decoding, lmx.train and lmx.data, each imported on first use: a
script that needs only the kernels (benchmarks/kernels on a GPU machine) does not pull in the data and training
dependencies."""

import importlib

__all__ = ["data", "decoding", "models", "pallas", "train"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"lmx.{name}")
    raise AttributeError(f"module 'lmx' has no attribute {name!r}")
