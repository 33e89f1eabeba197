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


def per_shard(fn, in_axes, out_axes):
    """`fn` run on each device's shard of its arguments under the current mesh (`use_mesh`), for ops XLA cannot
    partition: a Pallas kernel is an opaque custom call, around which XLA's partitioner would gather every operand
    and run the whole op on every device. in_axes: per positional argument, its logical axis names (None for an
    unnamed axis; a None argument is passed through as it is); out_axes: the same for fn's outputs (a tuple of them
    for several). Names resolve through the mesh's logical-axis rules, so fn must be exact on any split of those
    axes (rows, heads); a name whose axis some argument cannot split evenly (a batch of 1 at init) stays whole,
    and so do the names sharing its mesh axes.
    Without a mesh of more than one device this is fn itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    several = isinstance(out_axes[0], tuple)

    def call(*args):
        if len(args) != len(in_axes):
            raise ValueError(f"per_shard: {len(args)} arguments for {len(in_axes)} in_axes")
        given = [i for i, a in enumerate(args) if a is not None]
        wanted, even = {}, {}  # logical name -> its mesh axes; whether every argument's axis of it divides evenly
        for i in given:
            for name, size in zip(in_axes[i], args[i].shape, strict=True):
                axes = wanted[name] = nn.logical_to_mesh_axes((name,))[0]
                ways = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
                even[name] = even.get(name, True) and size % ways == 0
        # Names on the same mesh axes split together or not at all (query and kv heads: each shard's GQA map).
        whole = {wanted[n] for n in wanted if not even[n]}
        split = {n: None if axes in whole else axes for n, axes in wanted.items()}
        spec = lambda names: PartitionSpec(*(split.get(n) for n in names))  # noqa: E731

        def local(*xs):
            full = list(args)
            for i, x in zip(given, xs, strict=True):
                full[i] = x
            return fn(*full)

        outs = tuple(map(spec, out_axes)) if several else spec(out_axes)
        return jax.shard_map(local, mesh=mesh, in_specs=tuple(spec(in_axes[i]) for i in given), out_specs=outs,
                             check_vma=False)(*(args[i] for i in given))

    return call


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
