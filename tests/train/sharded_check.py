"""Run by test_sharded.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must
be set before jax is imported). Trains llama-tiny for 3 steps unsharded and on a (data=2, fsdp=2,
tensor=2) mesh from the same init, and prints one JSON line comparing them."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from lmx.data import CharTokenizer, batches, get_task
from lmx.models import build, init_params, preset
from lmx.sharding import batch_sharding, make_mesh, per_shard, replicated, use_mesh
from lmx.train import OptimConfig, TrainState, lr_schedule, make_optimizer, make_train_step


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main():
    assert jax.device_count() == 8, jax.devices()
    model = build(preset("llama-tiny"))
    # Adam divides by sqrt(v): a gradient entry near 0 moves its param by up to ~lr whatever its rounding,
    # so the params' difference scales with lr (measured 5e-5 at 1e-2, 5e-6 at 1e-3).
    opt_cfg = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=3)
    optimizer = make_optimizer(opt_cfg)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rng = jax.random.PRNGKey(0)
    ref = TrainState.create(model, optimizer, rng)
    sharded = TrainState.create(model, optimizer, rng, mesh=mesh)
    out = {"init_diff": max_diff(ref, sharded)}
    ref_step = make_train_step(model, optimizer, lr_fn=lr_schedule(opt_cfg))
    sharded_step = make_train_step(model, optimizer, mesh, lr_fn=lr_schedule(opt_cfg))
    data = batches(get_task("arithmetic", num_digits=(1, 2)), CharTokenizer(), 8, 48, seed=0)
    metric_diffs, losses = [], []
    for _ in range(3):
        batch = next(data)
        ref, m_ref = ref_step(ref, batch)
        sharded, m_sharded = sharded_step(sharded, batch)
        metric_diffs.append(max_diff(m_ref, m_sharded))
        losses.append(float(m_ref["loss"]))
    spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    gate = sharded.params["layers"]["mlp"]["gate"]
    out.update({
        "param_diff": max_diff(ref.params, sharded.params), "opt_diff": max_diff(ref.opt_state, sharded.opt_state),
        "metric_diff": max(metric_diffs), "losses": losses, "step": int(sharded.step),
        "gate_spec": spec(gate), "gate_shards": len(gate.addressable_shards),
        "gate_mu_spec": spec(sharded.opt_state[1][0].mu["layers"]["mlp"]["gate"]),
        "embedding_spec": spec(sharded.params["embed"]["embedding"]),
    })
    out.update(pallas_kernels_per_shard(mesh, rng))
    out["gqa_per_shard_diffs"] = gqa_map_per_shard(mesh)
    print(json.dumps(out))


def gqa_map_per_shard(mesh) -> list[float]:
    """per_shard splits query and kv heads together or not at all: a GQA map (query head n reads kv head n // G)
    computed per shard equals the global one, for kv heads that split over tensor=2 (4 / 2) and that do not (6 / 3:
    splitting the query heads alone would pair them with the wrong kv heads)."""
    gqa = lambda q_N, k_K: q_N + 10 * k_K[jnp.arange(q_N.shape[0]) // (q_N.shape[0] // k_K.shape[0])]  # noqa: E731
    diffs = []
    for N, K in ((4, 2), (6, 3)):
        q, k = jnp.arange(N, dtype=jnp.float32), jnp.arange(K, dtype=jnp.float32)
        with use_mesh(mesh):
            got = jax.jit(lambda q, k: per_shard(gqa, (("heads",), ("kv_heads",)), ("heads",))(q, k))(q, k)
        diffs.append(max_diff(got, gqa(q, k)))
    return diffs


def pallas_kernels_per_shard(mesh, rng) -> dict:
    """With impl="pallas" (kernels interpreted on the CPU) sharded == unsharded, every kernel inside a shard_map
    (per row and head shard: XLA cannot partition a pallas_call itself): one train step of a llama (flash
    attention forward and backward) and a Mamba-2 forward (SSD)."""
    cfg = preset("llama-tiny", num_layers=1)
    cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, impl="pallas"))
    model = build(cfg)
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, total_steps=1))
    ref = TrainState.create(model, optimizer, rng)
    sharded = TrainState.create(model, optimizer, rng, mesh=mesh)
    step, sharded_step = make_train_step(model, optimizer), make_train_step(model, optimizer, mesh)
    batch = next(batches(get_task("arithmetic", num_digits=(1, 2)), CharTokenizer(), 8, 40, seed=1))
    loss = lambda p: model.apply({"params": p}, batch["tokens_BT"], segment_ids_BT=batch["segment_ids_BT"]  # noqa: E731
                                 ).logits_BTV.sum()
    with use_mesh(mesh):  # what the sharded step traces: the model's gradient with its kernels
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(sharded.params))
    ref, m_ref = step(ref, batch)
    sharded, m_sharded = sharded_step(sharded, batch)
    out = {"pallas_metric_diff": max_diff(m_ref, m_sharded), "pallas_param_diff": max_diff(ref.params, sharded.params),
           "pallas_calls": jaxpr.count("pallas_call"), "pallas_shard_maps": jaxpr.count("shard_map")}
    # Mamba-2's SSD kernels (forward: a prefill or scoring call) on rows split over data x fsdp.
    cfg = preset("mamba2-tiny", num_layers=1)
    mamba = build(cfg.replace(ssm=dataclasses.replace(cfg.ssm, impl="pallas", chunk_size=16)))
    params = init_params(mamba, rng)
    logits = lambda p, t, s: mamba.apply({"params": p}, t, segment_ids_BT=s).logits_BTV  # noqa: E731
    args = (params, batch["tokens_BT"], batch["segment_ids_BT"])
    rows = jax.device_put(args[1:], batch_sharding(mesh))
    with use_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(logits)(*args))
        sharded_logits = jax.jit(logits)(jax.device_put(params, replicated(mesh)), *rows)
    out.update(ssd_logits_diff=max_diff(jax.jit(logits)(*args), sharded_logits),
               ssd_calls=jaxpr.count("pallas_call"), ssd_shard_maps=jaxpr.count("shard_map"),
               ssd_logits_spec=[list(a) if isinstance(a, tuple) else a for a in sharded_logits.sharding.spec])
    return out


if __name__ == "__main__":
    main()
