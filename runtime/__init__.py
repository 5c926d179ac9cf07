"""The slim runtime: loads artifacts and runs them (imports torch, safetensors, tokenizers, onnx
and xcompile._C, never the compile-time packages)."""

import os

# torch's parallel regions and xcompile._C's (each sized by its own thread count) alternate
# hundreds of times per decode step on the same few cores. With libgomp's default active
# waiting, idle threads spin after each region and steal the cores from the next one: a tiny
# model's decode step measured 16 ms active against 5 ms passive. Passive waiting costs a futex
# wake per region. libgomp reads this when it initializes: set it before torch is imported.
# Where xrun owns its cores (launch.bind: both pools sized alike, pinned), it sets
# GOMP_SPINCOUNT as well: threads then spin a bounded while before they sleep, which a decode
# step's back-to-back regions need (launch.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
