"""Device mesh ("data", "fsdp", "tensor") and the logical-axis rules that map named array axes onto it.

Params carry logical axis names from `nn.with_logical_partitioning` (see lmx.models.layers); activations
are constrained with `nn.with_logical_constraint`. Both resolve through `rules` inside `use_mesh`.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch splits over data and fsdp; weights are sharded ZeRO-3 style over fsdp
# along the model width, and Megatron style over tensor along heads / MLP width / vocabulary.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # Mamba-2 (lmx.models.ssm): the fused in-projection (z | x B C | dt) is not head-aligned, so the mixer's
    # own axes stay replicated; its weights are still sharded over fsdp along "embed".
    ("ssm_proj", None),
    ("ssm_conv", None),
    ("conv_width", None),
    ("ssm_heads", None),
    ("ssm_inner", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over `devices` (default: all); one axis size may be -1 (inferred)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: at most one -1, others >= 1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data}, fsdp={fsdp}, tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
    """Context in which logical constraints inside models resolve against `mesh`."""
    # jax.set_mesh replaces the deprecated `with mesh:`; fall back to it on jax versions without set_mesh.
    mesh_ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
    with mesh_ctx, nn.logical_axis_rules(rules):
        yield


def logical_specs(model: nn.Module, seq_len: int = 8):
    """PartitionSpecs of logical axis names for every param, without materialising any array."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))
    return nn.get_partition_spec(abstract)["params"]


def param_shardings(model: nn.Module, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for the (unboxed) params pytree of `model`."""
    return nn.logical_to_mesh_sharding(logical_specs(model), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded_params(model: nn.Module, mesh: Mesh, rng, rules=DEFAULT_RULES, seq_len: int = 8):
    """Initialise params directly into their shardings (no full copy on one device)."""
    shardings = param_shardings(model, mesh, rules)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    init = jax.jit(lambda r: nn.meta.unbox(model.init(r, tokens)["params"]), out_shardings=shardings)
    with use_mesh(mesh, rules):
        return init(rng)
