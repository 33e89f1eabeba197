"""What differs between the jax versions lmx runs on (0.10.2 on the CPU machines, 0.11.x on the lent GPU machine),
and the one dispatch rule every kernel module uses (`resolve_impl`).

Pallas's Triton lowering warns that it is deprecated from jax 0.11 on; it is still the one lowering that runs
forward and backward kernels in CPU interpret mode under 0.10.2 and unchanged on H100/H200, so that one warning is
silenced by its message (not all warnings)."""

from __future__ import annotations

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

__all__ = ["IMPLS", "TRITON_CUSTOM_CALL", "cuda_export", "on_gpu", "pl", "pltriton", "resolve_impl", "triton_params"]


def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Explicit Triton compiler params (the class was renamed across jax versions)."""
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_impl(op: str, impl: str, unsupported: str | None, interpret: bool = False) -> str:
    """The implementation a call runs: "xla" (the pure-jnp reference) or "pallas".

    unsupported: why the kernel cannot take these inputs (dtype, head dim, block shape...), or None.
    "pallas" with an unsupported input raises naming it; "auto" runs the kernel only on a GPU (or under
    interpret=True) with supported inputs, and otherwise falls back to the reference and logs why."""
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
    if not (interpret or on_gpu()):
        log.info("%s: impl='auto' runs the XLA reference on backend %r (kernels need a GPU)", op,
                 jax.default_backend())
        return "xla"
    return "pallas"


def cuda_export(fn, *args_or_shapes):
    """Cross-lower `fn` for CUDA with jax.export (works on a CPU-only jaxlib): the Triton lowering runs and
    rejects what the GPU compiler would (block shapes, dot sizes) before any GPU is involved. Returns the Exported."""
    from jax import export

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a for a in args_or_shapes]
    return export.export(jax.jit(fn), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)])(*shapes)
