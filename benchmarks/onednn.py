"""oneDNN's matmul, called through its C API with ctypes: a reference for the prompt matmuls
(benchmarks/prompt_matmul.py). Nothing in the runtime uses it.

The library comes from PyPI's `onednn-cpu-gomp` wheel (oneDNN 3.2, CPU only, GNU OpenMP): unzip
it and pass its lib/libdnnl.so.3. The `onednn` wheel (2026.x) is the SYCL build and needs Intel's
compiler runtimes (libsycl, libsvml, libimf, libtbb) to load at all.

    pip download --no-deps onednn-cpu-gomp==2023.2.0 && unzip onednn_cpu_gomp-*.whl -d onednn
    python benchmarks/prompt_matmul.py \
        --onednn onednn/onednn_cpu_gomp-2023.2.0.data/data/lib/libdnnl.so.3
"""

from __future__ import annotations

import ctypes

import torch

# from oneDNN's C headers (dnnl_common_types.h, dnnl_types.h)
_DTYPES = {torch.bfloat16: 2, torch.float32: 3}
_CPU_ENGINE, _IN_ORDER = 1, 1
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
_Dims = ctypes.c_int64 * 12


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class OneDnn:
    """One CPU engine and stream; matmul(x, w) builds a primitive for out = x w^T with w (N, K)
    in nn.Linear layout, read in place (oneDNN reorders it per call as it needs)."""

    def __init__(self, library: str):
        self.lib = ctypes.CDLL(library)
        self.engine, self.stream = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU_ENGINE, 0))
        self._check(self.lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, _IN_ORDER))

    @staticmethod
    def _check(status: int) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN call failed with status {status}")

    def _desc(self, dtype: torch.dtype, dims: tuple[int, int], strides: tuple[int, int]):
        desc = ctypes.c_void_p()
        self._check(
            self.lib.dnnl_memory_desc_create_with_strides(
                ctypes.byref(desc), 2, _Dims(*dims), _DTYPES[dtype], _Dims(*strides)
            )
        )
        return desc

    def _memory(self, desc, tensor: torch.Tensor):
        memory = ctypes.c_void_p()
        self._check(
            self.lib.dnnl_memory_create(
                ctypes.byref(memory), desc, self.engine, ctypes.c_void_p(tensor.data_ptr())
            )
        )
        return memory

    def matmul(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
        """A callable computing out (M, N) fp32 = x (M, K) w (N, K)^T; x and w of one dtype."""
        (m, k), n = x.shape, w.shape[0]
        src = self._desc(x.dtype, (m, k), (k, 1))
        weights = self._desc(w.dtype, (k, n), (1, k))  # w^T: (K, N) read column by column
        dst = self._desc(torch.float32, (m, n), (n, 1))
        pd, primitive = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(
            self.lib.dnnl_matmul_primitive_desc_create(
                ctypes.byref(pd), self.engine, src, weights, None, dst, None
            )
        )
        self._check(self.lib.dnnl_primitive_create(ctypes.byref(primitive), pd))
        args = (_ExecArg * 3)(
            _ExecArg(_ARG_SRC, self._memory(src, x)),
            _ExecArg(_ARG_WEIGHTS, self._memory(weights, w)),
            _ExecArg(_ARG_DST, self._memory(dst, out)),
        )
        keep = (x, w, out)  # the memories point into these

        def run() -> None:
            assert keep
            self._check(self.lib.dnnl_primitive_execute(primitive, self.stream, 3, args))
            self._check(self.lib.dnnl_stream_wait(self.stream))

        return run
