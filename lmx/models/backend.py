"""Backend-specific choices of the decode path, one named switch per concern, so the model maths elsewhere reads
like the papers' equations. Each switch says which backend it serves and why; the profiles behind them are in
benchmarks/RESULTS.md. Every choice here is exact: it changes how XLA lays out or schedules the same values,
never the values.

Switches (all evaluated at trace time):
- `write_slots`: a KV / ring write of T entries per row at per-row slots. XLA:CPU turns a one-row scatter into a
  bounds-checked dynamic-update-slice that copies the buffer, so one row uses a plain dynamic-update-slice.
- `ring_write`: one slot per row of a [B, Q, ...] ring. On XLA:CPU a small ring (<= SELECT_MAX elements: conv
  rings) is written by a one-hot select, because its scatter runs element by element.
- `computed_once`: on XLA:CPU an identity gather, which XLA never fuses into a consumer, so cheap producers (the
  causal conv, norms, rotations) are not recomputed for each element of the decode step's outer product.
- `unroll_chunk_pass`: the chunked SSD scan passes states across few chunks by an unrolled recurrence on
  XLA:CPU, which ran the (M+1)-contraction einsum as a slow batched matmul.
- `write_before_read`: on XLA:CPU a decode step writes a ring before reading the value back for one row: a read
  unordered with the in-place write made XLA copy the ring at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SELECT_MAX = 1 << 16  # ring elements up to which XLA:CPU ring writes select instead of scattering
UNROLL_PASS = 8  # chunk counts below which XLA:CPU passes SSD chunk states by an unrolled recurrence


def xla_cpu() -> bool:
    return jax.default_backend() == "cpu"


def write_slots(buf, new_BT, start_B, slot_axis: int):
    """Write each row's T new entries at slots start_B + t along `slot_axis` of a [B, ...] buffer, in place. Slots
    are clamped into the buffer: a write past its end overwrites the last slot instead of memory it does not own
    (callers report that as an overflow; see lmx.models.state)."""
    B, T = new_BT.shape[:2]
    S = buf.shape[slot_axis]
    if B == 1 and xla_cpu():  # XLA:CPU: a one-row scatter becomes a copying DUS; a plain DUS is in place
        new = jnp.moveaxis(new_BT, 1, slot_axis)
        start = [0] * buf.ndim
        start[slot_axis] = start_B[0]  # dynamic_update_slice clamps the start so the update fits
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)
    index = [slice(None)] * buf.ndim
    index[0] = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    index[slot_axis] = jnp.clip(start_B[:, None] + jnp.arange(T)[None, :], 0, S - 1)
    # In bounds by the clip, so XLA writes in place ("drop"/"clip" modes read the old buffer and copy it). Slots
    # are unique unless a row overflows, and then only the clamped last slot's value is left unspecified.
    return buf.at[tuple(index)].set(new_BT.astype(buf.dtype), mode="promise_in_bounds", unique_indices=True)


def ring_write(ring_BQ, pos_B, value_B):
    """Each row's value into slot pos % Q of a [B, Q, ...] ring, in place."""
    Q = ring_BQ.shape[1]
    if Q == 1:
        return ring_BQ.at[:, 0].set(value_B.astype(ring_BQ.dtype))
    if xla_cpu() and ring_BQ.shape[0] > 1 and ring_BQ.size <= SELECT_MAX:  # XLA:CPU: element-wise scatter is slow
        hit_BQ = (pos_B % Q)[:, None] == jnp.arange(Q)
        hit_BQ = hit_BQ.reshape(hit_BQ.shape + (1,) * (ring_BQ.ndim - 2))
        return jnp.where(hit_BQ, value_B[:, None].astype(ring_BQ.dtype), ring_BQ)
    return write_slots(ring_BQ, value_B[:, None], pos_B % Q, slot_axis=1)


def ring_read(ring_BQ, pos_B):
    """Each row's slot pos % Q of a [B, Q, ...] ring."""
    if ring_BQ.shape[1] == 1:
        return ring_BQ[:, 0]
    return ring_BQ[jnp.arange(ring_BQ.shape[0]), pos_B % ring_BQ.shape[1]]


def computed_once(a):
    """`a` itself; on XLA:CPU through an identity gather on its last axis, which XLA never fuses into a consumer
    that reads each element many times (so `a`'s producers run once, not once per read)."""
    if not xla_cpu():
        return a
    return jnp.take(a, jnp.arange(a.shape[-1]), axis=-1, mode="clip")


def unroll_chunk_pass(num_chunks: int) -> bool:
    """Whether the chunked SSD scan passes states across `num_chunks` chunks by an unrolled recurrence."""
    return xla_cpu() and num_chunks < UNROLL_PASS


def write_before_read(ring_BQ, pos_B, value_B):
    """(ring with value written at pos, the value to read on): on XLA:CPU with one row the value is read back from
    the written ring, so the write is ordered before every read of the value."""
    ring_BQ = ring_write(ring_BQ, pos_B, value_B)
    if xla_cpu() and ring_BQ.shape[0] == 1:
        return ring_BQ, ring_read(ring_BQ, pos_B)
    return ring_BQ, value_B
