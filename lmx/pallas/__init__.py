"""GPU kernels beside their pure-jnp references, one module per op (DESIGN §3 "Kernels"):

- `flash_attention`: forward + backward, GQA, causal, sliding window, packed segment ids that skip whole blocks;
  the transformer's teacher-forced calls (training, scoring) with `AttentionConfig.impl` != "xla";
- `decode_attention`: each row's last T queries over its KV cache (split-K, log-sum-exp merge); the decode step
  (T = 1), and calls onto a non-empty cache (speculative verification, a continued prefill);
- `ssd`: the Mamba-2 chunked scan, forward + backward; Mamba-2's teacher-forced calls and prefill with
  `SSMConfig.impl` != "xla" (Mamba-3 stays on its jnp path);
- `quant_matmul` + `quantize`: weight-only int8 / int4 / 2-bit / mixed 2+4-bit matmul; `lmx.models.quantize_params`.

Every op takes `impl` in "auto" | "xla" | "pallas" and `interpret=` (CPU tests): "xla" is the reference in the
same module, "pallas" the kernel (a ValueError names an input it cannot take), "auto" the kernel on a GPU for
supported inputs that it compiles for (each configuration is compiled once on its own first), and otherwise the
reference, logging why (`_compat.resolve_impl`). Kernels use the Pallas Triton lowering; `_compat` holds what
differs between jax versions, and `lowering_for_gpu` + `cuda_export` cross-lower a model's kernels on a CPU."""

from lmx.pallas.decode_attention import decode_attention
from lmx.pallas.flash_attention import flash_attention
from lmx.pallas.quant_matmul import QuantizedWeight, dequantize, quant_matmul, quantize
from lmx.pallas.ssd import ssd

__all__ = ["QuantizedWeight", "decode_attention", "dequantize", "flash_attention", "quant_matmul", "quantize", "ssd"]
