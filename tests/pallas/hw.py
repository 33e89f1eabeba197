"""Where the kernel-vs-reference tests run their kernels: interpreted on a CPU (`make test`), compiled on a GPU
(`pytest tests/pallas` on the lent GPU machine; benchmarks/gpu_suite.sh runs it after the benchmarks). A compiled
f32 dot runs in TF32 (the Triton lowering's default precision, as XLA's f32 matmuls on a GPU do), so f32
tolerances widen to TF32's there; bf16 tolerances stay."""

from lmx.pallas._compat import on_gpu

INTERPRET = not on_gpu()
TF32_TOL = 3e-3  # TF32 keeps 10 mantissa bits: ~1e-3 relative per product, accumulated in f32


def f32_tol(tol: float) -> float:
    """An f32 comparison's tolerance where the kernels run (interpreted: as given; compiled: TF32's)."""
    return tol if INTERPRET else max(tol, TF32_TOL)
