"""Weight-only quantization of a model: `quantize_params` replaces the large weight matrices (attention q/k/v/o, the
MLP, the Mamba-2 in/out projections and, optionally, the untied LM head) by `QuantizedWeight` leaves, and the
layers consume every weight through `weight` + `matmul`: the low-bit matmul (`lmx.pallas.quant_matmul`) for a
QuantizedWeight, the layer's own einsum / `@` otherwise (the unquantized path is the same ops as before).

Norms, biases, embeddings (a lookup; tied heads use them too) and the SSM's small per-head tensors stay as they
are. Stacked (scanned) layers keep their leading layer axis on every array of a QuantizedWeight, so `nn.scan`
and `decode_params` slice them like any other leaf.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lmx.pallas._compat import model_interpret
from lmx.pallas.quant_matmul import QuantizedWeight, dequantize, quant_matmul, quantize

__all__ = ["QUANTIZED", "QuantizedWeight", "dequantize_params", "matmul", "quantize_params", "weight",
           "weight_bytes"]

# (parent module, param) -> (logical ndim, leading input axes): the weights quantize_params replaces.
QUANTIZED = {("attn", "q"): (3, 1), ("attn", "k"): (3, 1), ("attn", "v"): (3, 1), ("attn", "o"): (3, 2),
             ("mlp", "gate"): (2, 1), ("mlp", "up"): (2, 1), ("mlp", "down"): (2, 1),
             ("mixer", "in_proj"): (2, 1), ("mixer", "out_proj"): (2, 1), (None, "lm_head"): (2, 1)}


def weight(module, name: str, init_fn, shape, dtype):
    """`module.param(name, init_fn, shape, dtype)`, or the QuantizedWeight stored under that name (flax's param()
    compares the stored leaves' shapes with the init's, which a packed weight cannot match)."""
    if module.has_variable("params", name):
        w = module.get_variable("params", name)
        if isinstance(w, QuantizedWeight):
            if w.shape != tuple(shape) or w.stack_shape:
                raise ValueError(f"{module.name}/{name}: QuantizedWeight of shape {w.stack_shape + w.shape}, "
                                 f"expected {tuple(shape)}")
            return w
    return module.param(name, init_fn, shape, dtype)


def matmul(x, w, dtype, spec: str | None = None):
    """x · w in `dtype`: `jnp.einsum(spec, x, w.astype(dtype))` (or `x @ w.astype(dtype)` without spec) for an
    array w; quant_matmul (impl = the weight's; "pallas" off a GPU interprets the kernel) for a QuantizedWeight,
    whose contracted axes must be x's last ones (checked against spec)."""
    if not isinstance(w, QuantizedWeight):
        w = w.astype(dtype)
        return x @ w if spec is None else jnp.einsum(spec, x, w)
    n = w.in_dims
    if spec is not None:
        ins, out = spec.split("->")
        xs, ws = ins.split(",")
        if xs[-n:] != ws[:n] or out != xs[:-n] + ws[n:]:
            raise ValueError(f"matmul: a QuantizedWeight contracts x's last {n} axes with its first; spec {spec!r}")
    lead = x.shape[:x.ndim - n]
    y = quant_matmul(x.astype(dtype).reshape(*lead, w.I), w, impl=w.impl, interpret=model_interpret(w.impl))
    return y.reshape(*lead, *w.shape[n:])


def _key(path) -> tuple:
    return (path[-2] if len(path) > 1 else None, path[-1])


def quantize_params(model, params, bits=8, group: int = 64, *, frac4: float = 0.1, tile: int = 128,
                    head: bool = True, impl: str = "auto"):
    """params with the model's large weight matrices (QUANTIZED; the LM head only if `head`) quantized to `bits`
    (8, 4, 2, "mixed", ... as `lmx.pallas.quant_matmul.quantize`) in groups of `group` input rows. The result
    decodes like params (model.apply, generate); impl: how its matmuls run ("auto": the kernel on a GPU when the
    shapes suit it, else the XLA reference)."""
    from lmx.models.lm import variant_module

    if variant_module(model.cfg) is not None:
        raise NotImplementedError("quantize_params: models with a variant (exits, parscale, recursion) are not "
                                  "supported; quantize the base LM")
    mamba2 = model.cfg.ssm is None or model.cfg.ssm.variant != "mamba3"
    found = []

    def visit(path, tree):
        if isinstance(tree, Mapping):
            return {k: visit((*path, k), v) for k, v in tree.items()}
        key = _key(path)
        if key not in QUANTIZED or (key[0] == "mixer" and not mamba2) or (key[1] == "lm_head" and not head):
            return tree
        if isinstance(tree, QuantizedWeight):
            raise ValueError(f"quantize_params: {'/'.join(path)} is quantized already")
        ndim, in_dims = QUANTIZED[key]
        found.append("/".join(path))
        return quantize(tree, bits, group, frac4=frac4, tile=tile, in_dims=in_dims, stack_dims=tree.ndim - ndim,
                        impl=impl)

    out = visit((), dict(params))
    if not found:
        raise ValueError("quantize_params: no weight matrix to quantize in these params")
    return out


def dequantize_params(params):
    """params with every QuantizedWeight replaced by the dense f32 weight it stands for."""
    return jax.tree.map(lambda w: dequantize(w) if isinstance(w, QuantizedWeight) else w, params,
                        is_leaf=lambda w: isinstance(w, QuantizedWeight))


def weight_bytes(params) -> int:
    """Bytes of every array in params (packed codes, scales and offsets of the quantized ones included)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
