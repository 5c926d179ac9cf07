"""Fused-op kernels of xcompile._C beside their torch references, on Llama-1B decode shapes.

TinyLlama-1.1B's: hidden 2048, intermediate 5632, 32 query heads of 64 over 4 KV heads; 512
tokens of context.
Columns, in microseconds per call (median
of timed batches):
  bound     the _C kernel called with pointers bound in advance, as the execution plan calls it
  wrapper   xcompile.runtime.kernels' checked Python wrapper (dtype/shape/alias checks each call)
  torch     the plain torch reference beside it in kernels.py
Attention rows add torch's scaled_dot_product_attention, the strongest torch peer.
Print only: nothing here is asserted.

    python benchmarks/kernels.py [--threads 2] [--context 512] [--prefill 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from xcompile import _C
from xcompile.runtime import kernels

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2048, 5632, 32, 4, 64


def microseconds(fn: Callable[[], object], batch_seconds: float = 0.02, batches: int = 15) -> float:
    """Median over batches of the mean time per call, after a warm-up batch."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < batch_seconds:
        fn()
        calls += 1
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: int) -> torch.Tensor:
    """torch's fused attention over the valid cache rows, KV heads shared without copies."""
    total = past + q.shape[0]
    k, v = k_cache[:, :total], v_cache[:, :total]
    mask = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), k, v, attn_mask=mask, enable_gqa=True
    ).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512, help="tokens in the KV cache (T)")
    parser.add_argument(
        "--prefill", type=int, default=128, help="prompt length of the prefill rows"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    # name -> (bound, wrapper, torch reference, sdpa or None)
    rows: dict[str, tuple[Callable[[], object], ...]] = {}

    x, skip, weight = randn(1, HIDDEN), randn(1, HIDDEN), randn(HIDDEN)
    normed, total = torch.empty(1, HIDDEN), torch.empty(1, HIDDEN)
    p = [t.data_ptr() for t in (x, skip, weight, normed, total)]
    rows["skip_rmsnorm (1, 2048)"] = (
        lambda: _C.skip_rmsnorm(*p, 1, HIDDEN, 1e-5),
        lambda: kernels.skip_rmsnorm(x, skip, weight, 1e-5, out=normed, sum_out=total),
        lambda: kernels.skip_rmsnorm_reference(x, skip, weight, 1e-5),
    )

    q, rotated = randn(1, HEADS, HEAD_DIM), torch.empty(1, HEADS, HEAD_DIM)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    cos, sin = (511 * inv_freq).cos()[None], (511 * inv_freq).sin()[None]  # position 511
    row = HEADS * HEAD_DIM
    p_rot = [q.data_ptr(), cos.data_ptr(), sin.data_ptr(), rotated.data_ptr()]
    for interleaved, name in ((False, "half split"), (True, "interleaved")):
        rows[f"rotary q (1, 32, 64), {name}"] = (
            lambda i=interleaved: _C.rotary(*p_rot, 1, HEADS, HEAD_DIM, HEAD_DIM, i, row, row),
            lambda i=interleaved: kernels.rotary(q, cos, sin, i, out=rotated),
            lambda i=interleaved: kernels.rotary_reference(q, cos, sin, i),
        )

    gate, up, act = randn(1, INTERMEDIATE), randn(1, INTERMEDIATE), torch.empty(1, INTERMEDIATE)
    rows["silu_mul (1, 5632)"] = (
        lambda: _C.silu_mul(gate.data_ptr(), up.data_ptr(), act.data_ptr(), INTERMEDIATE),
        lambda: kernels.silu_mul(gate, up, out=act),
        lambda: kernels.silu_mul_reference(gate, up),
    )
    rows["gelu_tanh (1, 5632)"] = (
        lambda: _C.gelu_tanh(gate.data_ptr(), act.data_ptr(), INTERMEDIATE),
        lambda: kernels.gelu_tanh(gate, out=act),
        lambda: kernels.gelu_tanh_reference(gate),
    )

    capacity = max(args.context, args.prefill)
    k_cache, v_cache = randn(KV_HEADS, capacity, HEAD_DIM), randn(KV_HEADS, capacity, HEAD_DIM)
    scale, past = HEAD_DIM**-0.5, args.context - 1
    for tokens, start, name in (
        (1, past, f"decode, T={args.context}"),
        (args.prefill, 0, "prefill"),
    ):
        q_new = randn(tokens, HEADS, HEAD_DIM)
        out = torch.empty_like(q_new)
        p_att = [t.data_ptr() for t in (q_new, k_cache, v_cache, out)]
        sizes = (tokens, HEADS, KV_HEADS, HEAD_DIM, capacity, start, 0, scale)
        rows[f"attention {name}, S={tokens}"] = (
            lambda p=p_att, s=sizes: _C.attention(*p, *s),
            lambda q=q_new, s=start, o=out: kernels.attention(q, k_cache, v_cache, s, scale, out=o),
            lambda q=q_new, s=start: kernels.attention_reference(q, k_cache, v_cache, s, scale),
            lambda q=q_new, s=start: sdpa(q, k_cache, v_cache, s),
        )

    print(f"isa={kernels.isa()} threads={args.threads}  (microseconds per call; x = torch / bound)")
    print(
        f"{'kernel':34s} {'bound':>8s} {'wrapper':>8s} {'torch':>8s} {'x':>6s} "
        f"{'sdpa':>8s} {'x':>6s}"
    )
    for name, fns in rows.items():
        times = [microseconds(fn) for fn in fns]
        line = (
            f"{name:34s} {times[0]:8.1f} {times[1]:8.1f} {times[2]:8.1f} "
            f"{times[2] / times[0]:5.1f}x"
        )
        if len(times) > 3:
            line += f" {times[3]:8.1f} {times[3] / times[0]:5.1f}x"
        print(line)


if __name__ == "__main__":
    main()
