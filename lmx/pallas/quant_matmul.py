"""Low-bit weight-only matmul: y_BO = x_BI · dequantize(w)_IO, the weight packed in int8 / int4 / 2-bit (or the
mixed 2/4-bit scheme of arXiv:2311.16442) with per-group scale and offset along I.

Format (`quantize`). Each column's input rows are cut into groups of `group` rows; a group g of column o holds
unsigned codes q in [0, 2^bits) with w ≈ q · scale[g, o] + offset[g, o] (min-max, asymmetric; scale and offset in
bf16, rounded so that [offset, offset + (2^bits - 1)·scale] still covers the group: every weight is within half a
step, scale/2, of its code). Codes are packed ⌊8/bits⌋ to a byte, planar within each group: byte r of group g
holds rows g·group + j·(group/⌊8/bits⌋) + r in bits [j·bits, (j+1)·bits). Unpacking field j of a group's bytes is
then a contiguous slab of rows, a plain operand of one tl.dot with the matching slab of x (no interleave in
registers). The reference takes any bits in [2, 8] and a last group padded past I; the kernel 2, 4, 8 and mixed,
power-of-two groups dividing I whose slabs have >= 16 rows (`unsupported` says why not).

Mixed (bits="mixed"): most groups 2-bit, the ~frac4 of groups with the widest ranges 4-bit. For memory alignment
every tile of `tile` output columns holds the same number of 4-bit groups (chosen per tile by the sum over its
columns of range², what 4 bits saves in squared error), stored in two dense planes (2-bit slots, 4-bit slots);
`slots[t]` lists which input group each slot of tile t holds, so the kernel reads aligned blocks of each plane and
gathers the matching rows of x.

Kernel (Triton lowering): grid (B blocks, O blocks); each program loops over the groups (slots), loads the packed
bytes (group·bits/8, block_o) once, and per bit field dequantizes a slab in registers and accumulates
x_slab · w_slab in f32. Partial blocks (B, O) are masked loads with 0 for every operand, and masked stores. The
backward (dx = dy · wᵀ; the quantized weights are constants) is a kernel over (B blocks, groups) looping over O.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmx.pallas._compat import kernel_compiles, pl, pltriton, resolve_impl, triton_params

F32, BF16 = jnp.float32, jnp.bfloat16
KERNEL_BITS = (2, 4, 8, "mixed")
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

__all__ = ["KERNEL_BITS", "QuantizedWeight", "dequantize", "quant_matmul", "quant_matmul_reference", "quantize",
           "unsupported"]


@flax.struct.dataclass
class QuantizedWeight:
    """A weight of logical `shape` (its first `in_dims` axes contracted: I = their product, O = the rest's), packed.
    Arrays may carry leading stack axes (a scanned layer stack); the static fields describe one weight.
    bits="mixed": `packed`/`scale`/`offset` are the 2-bit plane, `*4` the 4-bit plane, `slots` [tiles, G] the input
    group of each slot (2-bit slots first)."""

    packed: jax.Array  # uint8 [..., G·group·bits/8, O]
    scale: jax.Array  # bf16 [..., G, O]
    offset: jax.Array  # bf16 [..., G, O]
    packed4: jax.Array | None = None
    scale4: jax.Array | None = None
    offset4: jax.Array | None = None
    slots: jax.Array | None = None  # int32 [..., tiles, G]
    bits: int | str = flax.struct.field(pytree_node=False, default=8)
    group: int = flax.struct.field(pytree_node=False, default=64)
    shape: tuple = flax.struct.field(pytree_node=False, default=())
    in_dims: int = flax.struct.field(pytree_node=False, default=1)
    tile: int = flax.struct.field(pytree_node=False, default=0)
    impl: str = flax.struct.field(pytree_node=False, default="auto")

    @property
    def I(self) -> int:  # noqa: E743
        return math.prod(self.shape[:self.in_dims])

    @property
    def O(self) -> int:  # noqa: E743
        return math.prod(self.shape[self.in_dims:])

    @property
    def num_groups(self) -> int:
        return -(-self.I // self.group)

    @property
    def stack_shape(self) -> tuple:
        return self.scale.shape[:-2]

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def reshape(self, *shape) -> QuantizedWeight:
        """The same weight seen with another logical shape (the packed layout is [I, O] whatever the shape): the
        first axes whose product is I become the contracted ones."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        prods = list(np.cumprod((1, *shape)))
        if math.prod(shape) != self.I * self.O or self.I not in prods:
            raise ValueError(f"QuantizedWeight of shape {self.shape} (I={self.I}, O={self.O}) cannot be seen as "
                             f"{shape}: its leading axes must multiply to I")
        return self.replace(shape=shape, in_dims=prods.index(self.I))


# ------------------------------------------------------------------------------------------------------------
# Quantization and the reference.


def _parse_bits(bits):
    if bits in ("mixed", (2, 4)):
        return "mixed"
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) and 2 <= bits <= 8:
        return int(bits)
    raise ValueError(f"bits={bits!r}: expected an int in [2, 8], 'mixed' or (2, 4)")


def _bf16_down(v):
    r = v.astype(BF16)
    return jnp.where(r.astype(F32) > v, jnp.nextafter(r, jnp.array(-jnp.inf, BF16)), r)


def _bf16_up(v):
    r = v.astype(BF16)
    return jnp.where(r.astype(F32) < v, jnp.nextafter(r, jnp.array(jnp.inf, BF16)), r)


def _minmax(w_GgO, bits: int):
    """Codes (uint8) and bf16 scale/offset per group: offset rounded down, scale up, so the grid covers the group."""
    top = 2**bits - 1
    offset = _bf16_down(w_GgO.min(axis=1))
    scale = _bf16_up((w_GgO.max(axis=1) - offset.astype(F32)) / top)
    s = scale.astype(F32)[:, None]
    q = jnp.round((w_GgO - offset.astype(F32)[:, None]) / jnp.where(s > 0, s, 1.0))
    return jnp.clip(q, 0, top).astype(jnp.uint8), scale, offset


def _pack(q_GgO, bits: int):
    G, g, O = q_GgO.shape
    per = 8 // bits
    q = q_GgO.astype(jnp.uint32).reshape(G, per, g // per, O)
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[None, :, None, None]
    return jnp.sum(q << shifts, axis=1).astype(jnp.uint8).reshape(G * (g // per), O)


def _unpack(packed, bits: int, group: int):
    per = 8 // bits
    p = packed.astype(jnp.uint32).reshape(-1, 1, group // per, packed.shape[-1])
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[None, :, None, None]
    return ((p >> shifts) & (2**bits - 1)).reshape(-1, group, packed.shape[-1])  # [G, group, O]


def _choose_slots(w_GgO, n4: int, tile: int):
    """[tiles, G] int32: per tile of columns, the 2-bit groups then the n4 groups of widest range (each ascending)."""
    G, _, O = w_GgO.shape
    tiles = -(-O // tile)
    r2_GO = jnp.square(w_GgO.max(axis=1) - w_GgO.min(axis=1))
    score_TG = jnp.pad(r2_GO, ((0, 0), (0, tiles * tile - O))).reshape(G, tiles, tile).sum(-1).T
    top_TG = jnp.argsort(jnp.argsort(-score_TG, axis=1, stable=True), axis=1) < n4  # rank < n4
    key_TG = top_TG * G + jnp.arange(G)
    return jnp.argsort(key_TG, axis=1).astype(jnp.int32)


def _quantize_2d(w_IO, bits, group: int, n4: int, tile: int):
    I, O = w_IO.shape
    G = -(-I // group)
    w_GgO = jnp.pad(w_IO.astype(F32), ((0, G * group - I), (0, 0)), mode="edge").reshape(G, group, O)
    if bits != "mixed":
        q, scale, offset = _minmax(w_GgO, bits)
        return dict(packed=_pack(q, bits), scale=scale, offset=offset)
    slots_TG = _choose_slots(w_GgO, n4, tile)
    slots_GO = jnp.repeat(slots_TG, tile, axis=0)[:O].T  # each column's slot -> group
    w_SgO = jnp.take_along_axis(w_GgO, slots_GO[:, None, :], axis=0)
    (q2, s2, z2), (q4, s4, z4) = _minmax(w_SgO[:G - n4], 2), _minmax(w_SgO[G - n4:], 4)
    return dict(packed=_pack(q2, 2), scale=s2, offset=z2, packed4=_pack(q4, 4), scale4=s4, offset4=z4,
                slots=slots_TG)


@functools.cache
def _quantizer(bits, group: int, n4: int, tile: int):
    """_quantize_2d over a stack of weights, compiled once per configuration and shape."""
    return jax.jit(jax.vmap(functools.partial(_quantize_2d, bits=bits, group=group, n4=n4, tile=tile)))


def quantize(w, bits=8, group: int = 64, *, frac4: float = 0.1, tile: int = 128, in_dims: int = 1,
             stack_dims: int = 0, impl: str = "auto") -> QuantizedWeight:
    """Weight-only quantization of w (logical shape [*in, *out], contracted over its first `in_dims` axes, after
    `stack_dims` leading stack axes) with per-group min-max scale/offset along I = prod(in).

    bits: 2..8 (the kernel runs 2, 4, 8), or "mixed" / (2, 4): 2-bit with round(frac4·G) (at most G-1) groups
    per tile of `tile` output columns in 4-bit. group: rows per group; it must be a multiple of 8/bits
    (codes per byte); when it does not divide I the last group is padded (the reference handles it, the kernel
    refuses it). impl: how `lmx.models.quantize.matmul` runs this weight ("auto" | "xla" | "pallas")."""
    bits = _parse_bits(bits)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize: w has dtype {w.dtype}; expected a floating weight")
    if stack_dims < 0 or not 1 <= in_dims < w.ndim - stack_dims:
        raise ValueError(f"quantize: w of shape {w.shape} has no output axes after stack_dims={stack_dims}, "
                         f"in_dims={in_dims}")
    per = 4 if bits == "mixed" else 8 // bits
    if not isinstance(group, (int, np.integer)) or group <= 0 or group % per:
        raise ValueError(f"quantize: group={group!r} must be a positive multiple of {per} (codes per byte at "
                         f"bits={bits})")
    shape = tuple(w.shape[stack_dims:])
    lead = tuple(w.shape[:stack_dims])
    I, O = math.prod(shape[:in_dims]), math.prod(shape[in_dims:])
    G = -(-I // group)
    n4 = 0
    if bits == "mixed":
        if not 0 <= frac4 < 1:
            raise ValueError(f"quantize: frac4={frac4} must be in [0, 1)")
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"quantize: tile={tile} must be a power of two >= 16")
        n4 = int(min(round(frac4 * G), G - 1))  # the 2-bit plane is never empty
    planes = _quantizer(bits, int(group), n4, tile)(w.reshape(-1, I, O))
    planes = {k: v.reshape(*lead, *v.shape[1:]) for k, v in planes.items()}
    return QuantizedWeight(**planes, bits=bits, group=int(group), shape=shape, in_dims=in_dims,
                           tile=tile if bits == "mixed" else 0, impl=impl)


def dequantize(qw: QuantizedWeight, dtype=F32):
    """The weight qw stands for, [*stack, *shape] in `dtype` (codes · scale + offset in f32)."""
    if qw.stack_shape:
        n, k = math.prod(qw.stack_shape), len(qw.stack_shape)
        flat = jax.tree.map(lambda a: a.reshape(n, *a.shape[k:]), qw)
        return jax.vmap(lambda q: dequantize(q, dtype))(flat).reshape(*qw.stack_shape, *qw.shape)
    deq = lambda p, s, z, b: _unpack(p, b, qw.group).astype(F32) * s.astype(F32)[:, None] + z.astype(F32)[:, None]
    if qw.bits != "mixed":
        w_GgO = deq(qw.packed, qw.scale, qw.offset, qw.bits)
    else:
        w_SgO = jnp.concatenate([deq(qw.packed, qw.scale, qw.offset, 2), deq(qw.packed4, qw.scale4, qw.offset4, 4)])
        where_TG = jnp.argsort(qw.slots, axis=1)  # the slot of each group, per tile
        where_GO = jnp.repeat(where_TG, qw.tile, axis=0)[:qw.O].T
        w_GgO = jnp.take_along_axis(w_SgO, where_GO[:, None, :], axis=0)
    return w_GgO.reshape(-1, qw.O)[:qw.I].reshape(qw.shape).astype(dtype)


def _out_dtype(x):
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(F32)


def quant_matmul_reference(x_BI, qw: QuantizedWeight):
    """The XLA path: dequantize in jnp, cast to x's dtype, dot with f32 accumulation."""
    dt = _out_dtype(x_BI)
    w_IO = dequantize(qw, dt).reshape(qw.I, qw.O)
    return jnp.dot(x_BI.astype(dt), w_IO, preferred_element_type=F32).astype(dt)


# ------------------------------------------------------------------------------------------------------------
# The kernels.


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static shape of one kernel call."""

    bits: int | str
    group: int
    B: int
    I: int  # noqa: E741
    O: int  # noqa: E741
    G4: int  # mixed: 4-bit slots per tile (0 otherwise)
    tile: int
    block_b: int
    block_o: int
    interpret: bool

    @property
    def G(self) -> int:
        return self.I // self.group


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _blocks(B: int, O: int, tile: int, block_b, block_o) -> tuple[int, int]:
    """Default blocks: rows padded to >= 16 (the dot's M), up to 64; 128 output columns (at most the mixed tile)."""
    bb = block_b if block_b is not None else min(max(_pow2(B), 16), 64)
    bo = block_o if block_o is not None else min(max(_pow2(O), 16), 128, tile or 128)
    return bb, bo


def unsupported(x_BI, qw: QuantizedWeight, block_b=None, block_o=None) -> str | None:
    """Why the kernel cannot run x_BI · qw (None: it can)."""
    if jnp.dtype(x_BI.dtype) not in KERNEL_DTYPES:
        return f"x dtype {jnp.dtype(x_BI.dtype).name} (the kernel takes float32, bfloat16, float16)"
    if qw.bits not in KERNEL_BITS:
        return f"bits={qw.bits} (the kernel unpacks 2, 4, 8 or mixed)"
    if qw.I % qw.group:
        return f"group={qw.group} does not divide I={qw.I}"
    rows = qw.group // 4 if qw.bits == "mixed" else qw.group * qw.bits // 8
    if qw.group & (qw.group - 1) or rows < 16:
        return (f"group={qw.group} at bits={qw.bits}: the kernel needs a power-of-two group whose bit-field slabs "
                f"(group*bits/8 = {rows} rows) are >= 16 (a tl.dot dimension)")
    B = math.prod(x_BI.shape[:-1])
    bb, bo = _blocks(B, qw.O, qw.tile, block_b, block_o)
    for name, v in (("block_b", bb), ("block_o", bo)):
        if not isinstance(v, (int, np.integer)) or v < 16 or v & (v - 1):
            return f"{name}={v!r} (blocks must be powers of two >= 16)"
    if qw.bits == "mixed" and qw.tile % bo:
        return f"block_o={bo} must divide the mixed tile={qw.tile}"
    return None


def _load(ref, idx, mask):
    return pltriton.load(ref.at[idx], mask=mask, other=0)


def _dot_f32(a, b, trans_b=False):
    return lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())), preferred_element_type=F32)


def _group_dot(acc, x_ref, p_ref, s_ref, z_ref, slot, xgroup, bits, c: _Cfg, row_ok, col_ok, dt):
    """acc + x[:, rows of input group xgroup] · dequantized slot `slot` of one plane ([block_b, block_o])."""
    sub = c.group * bits // 8
    cols = slice(None)
    scale = _load(s_ref, (pl.ds(slot, 1), cols), col_ok[None, :]).astype(F32)
    offset = _load(z_ref, (pl.ds(slot, 1), cols), col_ok[None, :]).astype(F32)
    p = _load(p_ref, (pl.ds(slot * sub, sub), cols), col_ok[None, :]).astype(jnp.int32)
    for j in range(8 // bits):
        w = ((p >> (j * bits)) & (2**bits - 1)).astype(F32) * scale + offset
        xs = _load(x_ref, (slice(None), pl.ds(xgroup * c.group + j * sub, sub)), row_ok[:, None])
        acc += _dot_f32(xs.astype(dt), w.astype(dt))
    return acc


def _fwd_kernel(x_ref, p_ref, s_ref, z_ref, *rest, c: _Cfg):
    *extra, y_ref = rest  # mixed: the 4-bit plane (when it has slots) and slots
    m, o = pl.program_id(0), pl.program_id(1)
    row_ok = m * c.block_b + jnp.arange(c.block_b) < c.B
    col_ok = o * c.block_o + jnp.arange(c.block_o) < c.O
    dt = x_ref.dtype
    acc = jnp.zeros((c.block_b, c.block_o), F32)
    if c.bits != "mixed":
        acc = lax.fori_loop(0, c.G, lambda g, a: _group_dot(a, x_ref, p_ref, s_ref, z_ref, g, g, c.bits, c, row_ok,
                                                            col_ok, dt), acc)
    else:
        slots_ref = extra[-1]
        t = o * c.block_o // c.tile
        G2 = c.G - c.G4
        acc = lax.fori_loop(0, G2, lambda s, a: _group_dot(a, x_ref, p_ref, s_ref, z_ref, s, slots_ref[t, s], 2, c,
                                                           row_ok, col_ok, dt), acc)
        if c.G4:
            acc = lax.fori_loop(0, c.G4, lambda s, a: _group_dot(a, x_ref, *extra[:3], s, slots_ref[t, G2 + s], 4, c,
                                                                 row_ok, col_ok, dt), acc)
    pltriton.store(y_ref, acc.astype(y_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _compiler_params():  # memory-bound: 4 warps, 2 stages prefetch the next group's bytes
    return triton_params(num_warps=4, num_stages=2)


def _operands(c: _Cfg, planes):
    """The planes a kernel reads: a mixed weight whose 4-bit plane is empty (no 4-bit slots) passes none of it."""
    return planes if c.bits != "mixed" or c.G4 else (*planes[:3], planes[6])


def _full(a):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _forward(c: _Cfg, x_BI, planes):
    grid = (pl.cdiv(c.B, c.block_b), pl.cdiv(c.O, c.block_o))
    cols = lambda rows: pl.BlockSpec((rows, c.block_o), lambda m, o: (0, o))  # noqa: E731
    specs = [pl.BlockSpec((c.block_b, c.I), lambda m, o: (m, 0))]
    specs += [cols(planes[0].shape[0]), cols(c.G - c.G4), cols(c.G - c.G4)]
    if c.G4:
        specs += [cols(planes[3].shape[0]), cols(c.G4), cols(c.G4)]
    if c.bits == "mixed":
        specs += [_full(planes[6])]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, c=c), grid=grid, in_specs=specs,
        out_specs=pl.BlockSpec((c.block_b, c.block_o), lambda m, o: (m, o)),
        out_shape=jax.ShapeDtypeStruct((c.B, c.O), x_BI.dtype), compiler_params=_compiler_params(),
        interpret=c.interpret, name=f"quant_matmul_{c.bits}")(x_BI, *_operands(c, planes))


def _bwd_kernel(dy_ref, p_ref, s_ref, z_ref, *rest, c: _Cfg):
    """dx[block_b rows, input group gi] = sum over O blocks of dy · w[gi rows]ᵀ, in chunks of slab rows."""
    *extra, dx_ref = rest
    m, gi = pl.program_id(0), pl.program_id(1)
    row_ok = m * c.block_b + jnp.arange(c.block_b) < c.B
    dt = dy_ref.dtype
    mixed = c.bits == "mixed"
    bits = 2 if mixed else c.bits
    sub = c.group * bits // 8
    G2 = c.G - c.G4

    def body(ob, accs):
        col_ok = ob * c.block_o + jnp.arange(c.block_o) < c.O
        cols = pl.ds(ob * c.block_o, c.block_o)
        dy = _load(dy_ref, (slice(None), cols), row_ok[:, None] & col_ok[None, :]).astype(dt)
        if not mixed:
            slot, ok = gi, col_ok[None, :]
        else:  # this O block's tile stores group gi in a 2-bit or a 4-bit slot; read only that plane
            slot = extra[-1][ob * c.block_o // c.tile, gi]  # the inverse of slots
            is2 = slot < G2
            ok, ok4 = col_ok[None, :] & is2, col_ok[None, :] & ~is2
            s4 = jnp.maximum(slot - G2, 0)
            slot = jnp.minimum(slot, G2 - 1)
        scale = _load(s_ref, (pl.ds(slot, 1), cols), ok).astype(F32)
        offset = _load(z_ref, (pl.ds(slot, 1), cols), ok).astype(F32)
        p = _load(p_ref, (pl.ds(slot * sub, sub), cols), ok).astype(jnp.int32)
        if mixed and c.G4:
            p4_ref, s4_ref, z4_ref = extra[:3]
            scale4 = _load(s4_ref, (pl.ds(s4, 1), cols), ok4).astype(F32)
            offset4 = _load(z4_ref, (pl.ds(s4, 1), cols), ok4).astype(F32)
            halves = [_load(p4_ref, (pl.ds(s4 * 2 * sub + h * sub, sub), cols), ok4).astype(jnp.int32) for h in (0, 1)]
        out = []
        for j, acc in enumerate(accs):
            w = ((p >> (j * bits)) & (2**bits - 1)).astype(F32) * scale + offset
            if mixed and c.G4:  # 4-bit rows j·sub.. are field j // 2 of the half j % 2 of the slot's bytes
                w4 = ((halves[j % 2] >> (4 * (j // 2))) & 15).astype(F32) * scale4 + offset4
                w = jnp.where(is2, w, w4)
            out.append(acc + _dot_f32(dy, w.astype(dt), trans_b=True))
        return tuple(out)

    accs = tuple(jnp.zeros((c.block_b, sub), F32) for _ in range(8 // bits))
    accs = lax.fori_loop(0, pl.cdiv(c.O, c.block_o), body, accs)
    for j, acc in enumerate(accs):
        pltriton.store(dx_ref.at[:, pl.ds(j * sub, sub)], acc.astype(dx_ref.dtype), mask=row_ok[:, None])


def _backward(c: _Cfg, dy_BO, planes):
    if c.bits == "mixed":  # the kernel needs each group's slot per tile: the inverse of slots
        planes = (*planes[:6], jnp.argsort(planes[6], axis=1).astype(jnp.int32))
    ops = _operands(c, planes)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, c=c), grid=(pl.cdiv(c.B, c.block_b), c.G),
        in_specs=[pl.BlockSpec((c.block_b, c.O), lambda m, g: (m, 0)), *map(_full, ops)],
        out_specs=pl.BlockSpec((c.block_b, c.group), lambda m, g: (m, g)),
        out_shape=jax.ShapeDtypeStruct((c.B, c.I), dy_BO.dtype), compiler_params=_compiler_params(),
        interpret=c.interpret, name=f"quant_matmul_{c.bits}_dx")(dy_BO, *ops)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_matmul(c: _Cfg, x_BI, planes):
    return _forward(c, x_BI, planes)


def _kernel_matmul_fwd(c, x_BI, planes):
    return _forward(c, x_BI, planes), planes


def _kernel_matmul_bwd(c, planes, dy_BO):
    zero = lambda a: (np.zeros(a.shape, jax.dtypes.float0) if jnp.issubdtype(a.dtype, jnp.integer)  # noqa: E731
                      else jnp.zeros_like(a))
    return _backward(c, dy_BO, planes), tuple(zero(a) for a in planes)


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def quant_matmul(x_BI, qw: QuantizedWeight, *, impl: str = "auto", interpret: bool = False, block_b=None,
                 block_o=None):
    """y = x · dequantize(qw): x [..., I] (leading axes flattened into rows), returns [..., O] in x's dtype (f32
    for integer x). impl: "xla" (the jnp reference), "pallas" (the kernel; raises on inputs it cannot take) or
    "auto" (the kernel on a GPU or under interpret=True when supported, else the reference, logged).
    block_b / block_o: kernel blocks (powers of two >= 16; default from the shapes). Differentiable in x (the
    backward is a kernel too); the quantized weight is a constant (zero cotangent)."""
    if qw.stack_shape:
        raise ValueError(f"quant_matmul: qw has stack axes {qw.stack_shape}; slice one weight out first")
    if x_BI.shape[-1] != qw.I:
        raise ValueError(f"quant_matmul: x has shape {tuple(x_BI.shape)}, expected [..., I={qw.I}]")
    lead = x_BI.shape[:-1]
    x2 = x_BI.reshape(-1, qw.I)
    why = unsupported(x2, qw, block_b, block_o)
    mixed = qw.bits == "mixed"
    planes = (qw.packed, qw.scale, qw.offset) + ((qw.packed4, qw.scale4, qw.offset4, qw.slots) if mixed else ())
    c = None
    if why is None:
        bb, bo = _blocks(x2.shape[0], qw.O, qw.tile, block_b, block_o)
        c = _Cfg(qw.bits, qw.group, x2.shape[0], qw.I, qw.O, qw.scale4.shape[0] if mixed else 0, qw.tile, bb, bo,
                 bool(interpret))
    grad_x = jax.grad(lambda x, p: _kernel_matmul(c, x, p).astype(jnp.float32).sum())  # "auto"'s compile probe
    probe = lambda: kernel_compiles("quant_matmul", c, grad_x, x2, planes)
    if resolve_impl("quant_matmul", impl, why, interpret, probe) == "xla":
        y = quant_matmul_reference(x2, qw)
    else:
        y = _kernel_matmul(c, x2, planes)
    return y.reshape(*lead, qw.O)
