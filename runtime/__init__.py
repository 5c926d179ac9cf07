"""The slim runtime: loads artifacts and runs them on numpy and xcompile._C (plus safetensors'
format, tokenizers and onnx's protobuf reader), never torch or the compile-time packages; torch is
imported only where a user asks for it (`xrun --reference`, `--backend torch`)."""

import os

# numpy's BLAS (FP32 prompts), and xcompile._C's parallel regions (each sized by its own
# thread count) alternate hundreds of times per decode step on the same few cores. With
# libgomp's default active waiting, idle threads spin after each region and steal the cores from
# the next one: a tiny model's decode step measured 16 ms active against 5 ms passive. Passive
# waiting costs a futex wake per region. libgomp reads this when it initializes: set it before
# xcompile._C is imported. Where xrun owns its cores (launch.bind: pinned), it sets
# GOMP_SPINCOUNT as well: threads then spin a bounded while before they sleep, which a decode
# step's back-to-back regions need (launch.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
