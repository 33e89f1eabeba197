"""What differs between the jax versions lmx runs on (0.10.2 on the CPU machines, 0.11.x on the lent GPU machine),
and the one dispatch rule every kernel module uses (`resolve_impl`).

Pallas's Triton lowering warns that it is deprecated from jax 0.11 on; it is still the one lowering that runs
forward and backward kernels in CPU interpret mode under 0.10.2 and unchanged on H100/H200, so that one warning is
silenced by its message (not all warnings)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import jax
from jax.experimental import pallas as pl

try:  # the Triton lowering's namespace; its module may warn on import in 0.11.x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - a jax without the Triton lowering
    pltriton = None

warnings.filterwarnings("ignore", message=r".*[Tt]riton.*deprecated.*")

IMPLS = ("auto", "xla", "pallas")
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"  # the custom call a Triton pallas_call lowers to
log = logging.getLogger("lmx.pallas")

__all__ = ["IMPLS", "MIN_DOT", "TRITON_CUSTOM_CALL", "cuda_export", "kernel_compiles", "kernel_dot_shapes",
           "lowering_for_gpu", "model_interpret", "on_gpu", "pl", "pltriton", "resolve_impl", "triton_params"]


def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Explicit Triton compiler params (the class was renamed across jax versions)."""
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_impl(op: str, impl: str, unsupported: str | None, interpret: bool = False, probe=None) -> str:
    """The implementation a call runs: "xla" (the pure-jnp reference) or "pallas".

    unsupported: why the kernel cannot take these inputs (dtype, head dim, block shape...), or None.
    "pallas" with an unsupported input raises naming it; "auto" runs the kernel only on a GPU (or under
    interpret=True) with supported inputs, and otherwise falls back to the reference and logs why.
    probe: None, or a thunk -> why the compiled kernel fails to build for these inputs (`kernel_compiles`), or
    None: "auto" on a GPU calls it and falls back on a lowering or compile error too."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} must be one of {IMPLS}")
    if impl == "xla":
        return "xla"
    if impl == "pallas":
        if unsupported is not None:
            raise ValueError(f"{op}: impl='pallas' cannot run these inputs: {unsupported}")
        return "pallas"
    if unsupported is not None:
        log.info("%s: impl='auto' falls back to the XLA reference: %s", op, unsupported)
        return "xla"
    if interpret:
        return "pallas"
    if not on_gpu():
        log.info("%s: impl='auto' runs the XLA reference on backend %r (kernels need a GPU)", op,
                 jax.default_backend())
        return "xla"
    failed = None if probe is None else probe()
    if failed is not None:
        log.warning("%s: impl='auto' falls back to the XLA reference: %s", op, failed)
        return "xla"
    return "pallas"


_BUILDS: dict = {}  # (op, static config, argument shapes) -> None, or why the kernel failed to build


def kernel_compiles(op: str, static, fn, *args) -> str | None:
    """Why jit(fn) fails to lower or compile for args' shapes and dtypes on this backend (None if it builds):
    "auto"'s probe. The Triton compiler runs only on a GPU, at XLA compile time, where an error would otherwise
    end the caller's whole program; so each (op, static, shapes) is compiled once on its own, here, and the answer
    kept. fn should be the kernel path as it will be used (differentiated where the kernel has a backward)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    key = (op, static, str(jax.tree.structure(shapes)),
           tuple((s.shape, str(s.dtype)) for s in jax.tree.leaves(shapes)))
    if key not in _BUILDS:
        try:
            jax.jit(fn).lower(*shapes).compile()
            _BUILDS[key] = None
        except Exception as e:  # noqa: BLE001 - any lowering / compiler error is a reason to fall back
            _BUILDS[key] = f"the kernel failed to build ({type(e).__name__}: {str(e).strip()[:300]})"
    return _BUILDS[key]


MIN_DOT = 16  # Triton's tl.dot needs every operand dimension >= 16


def kernel_dot_shapes(jaxpr, inside: bool = False):
    """Operand shapes of every dot inside a pallas_call of `jaxpr` (a core.Jaxpr), recursively."""
    from jax import extend as jex

    for eqn in jaxpr.eqns:
        if inside and eqn.primitive.name == "dot_general":
            yield tuple(x.aval.shape for x in eqn.invars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = sub.jaxpr if isinstance(sub, jex.core.ClosedJaxpr) else sub
                if isinstance(sub, jex.core.Jaxpr):
                    yield from kernel_dot_shapes(sub, inside or eqn.primitive.name == "pallas_call")


def cuda_export(fn, *args_or_shapes):
    """Cross-lower `fn` for CUDA with jax.export (works on a CPU-only jaxlib): the Triton lowering runs and rejects
    what it can (non-power-of-two blocks, ...) before any GPU is involved. The Triton compiler itself runs only on
    the GPU, so the dot sizes it would refuse are checked here on the kernels' jaxprs (ValueError naming the
    shapes). Returns the Exported."""
    from jax import export

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a for a in args_or_shapes]
    small = [s for s in kernel_dot_shapes(jax.make_jaxpr(fn)(*shapes).jaxpr) if min(d for x in s for d in x) < MIN_DOT]
    if small:
        raise ValueError(f"a kernel has tl.dot operands with a dimension below {MIN_DOT} (Triton refuses them): "
                         f"{small[:4]}")
    return export.export(jax.jit(fn), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(*shapes)


_FOR_GPU = [False]


@contextlib.contextmanager
def lowering_for_gpu():
    """While active, models build their kernels as on a GPU (interpret=False) even on a CPU: a model traced inside
    it can be cross-lowered with `cuda_export` (its kernels lower to Triton), not run."""
    before, _FOR_GPU[0] = _FOR_GPU[0], True
    try:
        yield
    finally:
        _FOR_GPU[0] = before


def model_interpret(impl: str) -> bool:
    """The interpret flag a model passes with its config's impl: kernels off a GPU run only in interpret mode, so
    impl="pallas" on a CPU interprets them (the model-level tests); "auto" there runs the XLA reference instead."""
    return impl == "pallas" and not (on_gpu() or _FOR_GPU[0])
