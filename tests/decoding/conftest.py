import functools

import jax
import numpy as np
import pytest

import lmx.models as lm


@functools.cache
def _tiny(name: str):
    """(model, params): the exact pytree `init_params` builds, filled with seeded numpy normals.

    Calling init_params itself costs 4-9 s of CPU per preset here (compiling its threefry draws); decoding
    tests only need fixed random weights of the right structure.
    """
    model = lm.build(lm.preset(name))
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


@pytest.fixture(scope="session")
def tiny():
    """tiny(preset_name) -> (model, params), built once per session."""
    return _tiny
