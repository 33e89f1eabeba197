"""Tiny models with fixed random weights, shared by the whole suite (tests import `tiny_model`; the `tiny`
fixture in conftest.py hands out the same function)."""

import functools

import jax
import numpy as np

import lmx.models as lm

# hybrid-tiny as 2 units of (Mamba-2, attention): both layer kinds and a stacked unit at half the 8-layer preset's
# compile time (a decode program unrolls its layers), for tests that need no more.
HYBRID_2X2 = dict(num_layers=4, layer_pattern=("ssm", "attn") * 2)


def tiny_model(name: str, **overrides):
    """(model, params) for preset `name` (with config fields overridden): the exact pytree `init_params` builds,
    filled with seeded numpy normals.

    Calling init_params itself costs 4-9 s of CPU per preset here (compiling its threefry draws); decoding
    tests only need fixed random weights of the right structure.
    """
    return _tiny(name, tuple(sorted(overrides.items())))


@functools.cache
def _tiny(name: str, overrides: tuple):
    model = lm.build(lm.preset(name, **dict(overrides)))
    shapes = jax.eval_shape(lambda: lm.init_params(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        if "scale" in name:  # norm scales around 1
            return 1 + 0.1 * noise
        if "bias" in name:
            return 0.1 * noise
        return noise / np.sqrt(model.cfg.d_model)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)
