"""Fast paths for the two weight-sized passes of a step (see :mod:`lora_optim.kernels.native`).

A step of a low-rank parameter must read ``G`` once (both factor gradients come from that one
read) and read and write ``W`` once (the weight change). The torch reference math reads ``G``
twice through two skinny GEMMs, which run far below the machine's GEMM rate, and makes
weight-sized temporaries for bf16 weights. The compiled CPU kernels here do each pass in one
sweep over row chunks sized for the cache; the projections fall back to torch wherever the
kernels do not apply (other devices, other dtypes, no compiler).
"""

from lora_optim.kernels.native import NativeKernels, native_enabled, native_kernels, use_native

__all__ = ["NativeKernels", "native_kernels", "native_enabled", "use_native"]
