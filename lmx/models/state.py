"""Decode state: what `model.apply` (and the layer-loop pieces in lmx.models.lm) read and return, and the generic
pure helpers every decoding algorithm uses on it.

`DecodeState(lengths_B, layers, overflow_B, max_len)`: `layers` is a tuple in `layer_pattern` order, one state
object per layer, of the class its block declares, defined beside its mixer:
- attention: `lmx.models.attention.KVState` (its KV buffers, layout private to attention);
- Mamba-2: `lmx.models.ssm.Mamba2LayerState` (conv and state rings, a rollback floor, a pending record);
- Mamba-3: `lmx.models.mamba3.Mamba3LayerState` (rings of its per-position states, floor, pending record).
Every leaf has the batch on axis 0, so `select` and `repeat` are plain tree maps. Each layer state owns its
`init`, `commit` (fold the pending record of a multi-token call up to the valid lengths) and `rollback`; the
blocks commit a pending record at the start of their next call, and `truncate` commits and rolls back.

Positions. Row b's next token goes to position lengths_B[b]: KV slot s holds position s (no left padding), and
SSM rings hold position p in slot p % Q. Right-padded prompts are prefilled whole, then `truncate`d to their true
lengths: padding KV slots are overwritten by the next tokens, and an SSM layer's pending prefill is folded in only
up to each row's length, so padding never reaches its state.

Rollback. Attention rolls back by lengths alone. An SSM layer keeps the states of its last rollback_window R_w
committed positions (`init_state(..., rollback_window=)` overrides SSMConfig's for one state: plain sampling
uses 0, speculative decoding at least γ), so it can restore any length >= its `floor_B`; below that `truncate`
raises when the lengths are concrete, and under jit it is the caller's contract. SSM state memory per layer and
row: (conv_width - 1 + R_w)·Y·bytes(dtype) + (R_w + 1)·N·H·Z·4 for Mamba-2 (lmx.decoding.cost has both kinds).

Capacity. A call of T tokens on a row of length n writes positions n .. n + T - 1, which must be < max_len.
Outside jit a call that would not fit raises; inside jit the writes are clamped into the buffers (the last slot
takes them, never memory outside) and the row's `overflow_B` is set, which decoding loops report as the
`overflow` stat: an overflowed row's tokens are not to be trusted.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig


@flax.struct.dataclass
class DecodeState:
    lengths_B: jax.Array  # int32: number of valid positions per row
    layers: tuple  # one state object per layer, in layer_pattern order
    overflow_B: jax.Array  # bool: some call of this row needed more than max_len positions (writes were clamped)
    max_len: int = flax.struct.field(pytree_node=False, default=0)  # positions each row can hold

    @property
    def batch_size(self) -> int:
        return self.lengths_B.shape[0]


def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype=None, rollback_window: int | None = None
               ) -> DecodeState:
    """Empty state for `batch` rows of `max_len` positions. `dtype` (default cfg.dtype) is that of the KV buffers
    and conv rings; SSM states are float32. `rollback_window` (default cfg.ssm.rollback_window) sizes the SSM
    rings of this state: a caller that never rolls back further than the multi-token call it just made (plain
    sampling: `generate`) passes 0 and keeps one state slot per layer; speculative decoding passes at least γ."""
    from lmx.models.lm import layer_state_classes  # the blocks declare their state classes

    if max_len <= 0 or batch <= 0:
        raise ValueError(f"init_state needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    if rollback_window is not None and (isinstance(rollback_window, bool) or not isinstance(rollback_window, int)
                                        or rollback_window < 0):
        raise ValueError(f"init_state: rollback_window={rollback_window!r} must be an int >= 0 (or None)")
    dtype = jnp.dtype(dtype or cfg.dtype)
    layers = tuple(cls.init(cfg, batch, max_len, dtype, rollback_window) for cls in layer_state_classes(cfg))
    return DecodeState(lengths_B=jnp.zeros((batch,), jnp.int32), layers=layers,
                       overflow_B=jnp.zeros((batch,), bool), max_len=max_len)


def select(state: DecodeState, idx_B) -> DecodeState:
    """Gather rows: new row i is old row idx_B[i] (resampling, beam reordering)."""
    idx_B = jnp.asarray(idx_B, jnp.int32)
    return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), state)


def repeat(state: DecodeState, num_samples: int) -> DecodeState:
    """Each row repeated `num_samples` times consecutively: row b -> rows b*R .. b*R+R-1."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), state)


def truncate(state: DecodeState, lengths_B) -> DecodeState:
    """Roll each row back to `lengths_B` positions (never forward: longer lengths leave a row as it is). Each layer
    commits a pending multi-token call up to the new lengths, then rolls back (see the module docstring)."""
    lengths_B = jnp.minimum(jnp.asarray(lengths_B, jnp.int32), state.lengths_B)
    return state.replace(lengths_B=lengths_B, layers=tuple(layer.rollback(lengths_B) for layer in state.layers))
