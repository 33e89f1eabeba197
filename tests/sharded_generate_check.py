"""Run by test_sharding.py in a fresh interpreter with 8 fake CPU devices (XLA_FLAGS must be set before
jax is imported). Generates from llama-tiny (sampled) and mamba3-tiny (greedy) unsharded and with
params sharded over a (2, 2, 2) mesh; llama-tiny also with impl="pallas" (its kernels per shard)."""

import dataclasses
import json

import jax
import numpy as np

from lmx.decoding import Sampler, generate
from lmx.models import build, init_params, preset
from lmx.sharding import init_sharded_params, make_mesh, use_mesh


def main():
    assert jax.device_count() == 8, jax.devices()
    model = build(preset("llama-tiny", num_layers=1))  # one layer: the sharding rules are per layer
    rng = jax.random.PRNGKey(0)
    params = init_params(model, rng)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = init_sharded_params(model, mesh, rng)
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6], [1, 8, 8]]
    out = {"gate_shards": len(sharded["layers"]["mlp"]["gate"].addressable_shards)}
    for name, sampler, r in [("sampled", Sampler(temperature=1.0), jax.random.PRNGKey(3))]:  # greedy: mamba3 below
        ref = generate(model, params, prompts, max_new_tokens=8, sampler=sampler, rng=r, num_samples=2)
        with use_mesh(mesh):
            got = generate(model, sharded, prompts, max_new_tokens=8, sampler=sampler, rng=r, num_samples=2)
        out[name + "_same_tokens"] = bool(np.array_equal(ref.tokens_BRT, got.tokens_BRT))
        out[name + "_logprob_diff"] = float(np.max(np.abs(np.asarray(ref.logprobs_BRT) - np.asarray(got.logprobs_BRT))))
    # impl="pallas" (interpreted): the prefill's flash attention and every step's decode attention per shard.
    attn = model.cfg.attention
    kernels = build(model.cfg.replace(attention=dataclasses.replace(attn, impl="pallas")))
    ref = generate(model, params, prompts, max_new_tokens=8, num_samples=2)
    with use_mesh(mesh):
        got = generate(kernels, sharded, prompts, max_new_tokens=8, num_samples=2)
    out["pallas_same_tokens"] = bool(np.array_equal(ref.tokens_BRT, got.tokens_BRT))
    out["pallas_logprob_diff"] = float(np.max(np.abs(np.asarray(ref.logprobs_BRT) - np.asarray(got.logprobs_BRT))))
    # Mamba-3: heads split over "tensor"; the decode state (rings, pending record) follows the sharded compute.
    model = build(preset("mamba3-tiny", num_layers=1))
    params, sharded = init_params(model, rng), init_sharded_params(model, mesh, rng)
    ref = generate(model, params, prompts, max_new_tokens=8, num_samples=2)
    with use_mesh(mesh):
        got = generate(model, sharded, prompts, max_new_tokens=8, num_samples=2)
    out["mamba3_in_x_spec"] = [list(a) if isinstance(a, tuple) else a
                               for a in sharded["layers"]["mixer"]["in_x"].sharding.spec]
    out["mamba3_same_tokens"] = bool(np.array_equal(ref.tokens_BRT, got.tokens_BRT))
    out["mamba3_logprob_diff"] = float(np.max(np.abs(np.asarray(ref.logprobs_BRT) - np.asarray(got.logprobs_BRT))))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
