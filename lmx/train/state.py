"""TrainState: params, optimizer state, step and rng in one pytree, created directly into its shardings."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lmx.models import init_params
from lmx.sharding import DEFAULT_RULES, param_shardings, use_mesh


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: number of updates applied so far
    rng: jax.Array  # raw uint32[2] key (not a typed key) so it checkpoints as a plain array

    @classmethod
    def create(cls, model: nn.Module, optimizer: optax.GradientTransformation, rng, mesh: Mesh | None = None,
               rules=DEFAULT_RULES) -> TrainState:
        """Initialise params and optimizer state. With a mesh, every array is created in its final
        sharding by one jitted program (shapes come from `jax.eval_shape`), so no full copy ever exists
        on one device. The values do not depend on the mesh (partitionable threefry)."""
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)  # typed key -> raw uint32 (see `rng` above)
        init_rng, state_rng = jax.random.split(rng)
        init = _jitted_init(model, optimizer, mesh, rules)
        if mesh is None:
            return init(init_rng, state_rng)
        with use_mesh(mesh, rules):
            return init(init_rng, state_rng)


@functools.lru_cache(maxsize=16)
def _jitted_init(model, optimizer, mesh, rules):
    """Cached per (model, optimizer, mesh), so creating a state twice compiles once."""
    init = _init_fn(model, optimizer)
    if mesh is None:
        return jax.jit(init)
    return jax.jit(init, out_shardings=state_shardings(model, optimizer, mesh, rules))


def _init_fn(model, optimizer):
    def init(init_rng, state_rng):
        params = init_params(model, init_rng)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), state_rng)

    return init


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
                   rules=DEFAULT_RULES) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the TrainState: the restore target for checkpoints."""
    shapes = jax.eval_shape(_init_fn(model, optimizer), jax.random.PRNGKey(0), jax.random.PRNGKey(0))
    shardings = state_shardings(model, optimizer, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
                    rules=DEFAULT_RULES) -> TrainState:
    """Shardings of every TrainState leaf. Params follow the logical-axis rules; an optimizer-state leaf
    that mirrors a param (same dict-key path, e.g. Adam's mu/nu, and same shape) takes that param's
    sharding; everything else (counts, step, rng) is replicated. Without a mesh: the default device."""
    shapes = jax.eval_shape(_init_fn(model, optimizer), jax.random.PRNGKey(0), jax.random.PRNGKey(0))
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: one, shapes)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shard = param_shardings(model, mesh, rules)
    by_path = {
        _dict_keys(path): (s, leaf.shape)
        for (path, s), leaf in zip(jax.tree_util.tree_flatten_with_path(p_shard)[0],
                                   jax.tree.leaves(shapes.params), strict=True)
    }

    def opt_leaf(path, leaf):
        sharding, shape = by_path.get(_dict_keys(path), (replicated, None))
        return sharding if shape == leaf.shape else replicated

    opt = jax.tree_util.tree_map_with_path(opt_leaf, shapes.opt_state)
    return TrainState(params=p_shard, opt_state=opt, step=replicated, rng=replicated)


def _dict_keys(path) -> tuple:
    """The dict keys along a pytree path (params are nested dicts; optax wraps them in namedtuples)."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
