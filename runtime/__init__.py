"""The slim runtime: loads artifacts and runs them (imports torch, safetensors, tokenizers, onnx
and xcompile._C, never the compile-time packages)."""

import os

# Two OpenMP runtimes share the cores: torch's bundled libgomp and the one xcompile._C links
# (csrc does not link libtorch, so it cannot borrow torch's pool). With the default active
# waiting, each pool's idle threads spin for ~100 ms after every parallel region and starve the
# other's: a decode step became 3-4x slower. Passive waiting costs a futex wake per region.
# Read when each libgomp initializes, so it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
