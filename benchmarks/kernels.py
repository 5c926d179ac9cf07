"""Fused-op kernels of xcompile._C beside their torch references, on Llama-3.2-1B decode shapes.

hidden 2048, intermediate 8192, 32 heads of 64 over 4 KV heads, 512 tokens of context. Each row:
microseconds per call (median of repeated timed batches) for xcompile (writing into preallocated
buffers, as the plan does) and for the plain torch reference in kernels.py, and their ratio.
Attention also runs against torch's scaled_dot_product_attention, the strongest torch peer.
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

from xcompile.runtime import kernels

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2048, 8192, 32, 4, 64


def microseconds(fn: Callable[[], object], batch_seconds: float = 0.02, batches: int = 15) -> float:
    """Median over batches of the mean time per call, after a warm-up batch."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < batch_seconds:
        fn()
        calls += 1
    per_batch = max(calls, 1)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        times.append((time.perf_counter() - start) / per_batch)
    return statistics.median(times) * 1e6


def sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: int) -> torch.Tensor:
    """torch's fused attention over the valid cache rows (GQA by repeating KV heads)."""
    total, group = past + q.shape[0], q.shape[1] // k_cache.shape[0]
    k = k_cache[:, :total].repeat_interleave(group, dim=0)
    v = v_cache[:, :total].repeat_interleave(group, dim=0)
    mask = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)


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

    rows: list[tuple[str, Callable[[], object], Callable[[], object]]] = []

    x, skip, weight = randn(1, HIDDEN), randn(1, HIDDEN), randn(HIDDEN)
    normed, total = torch.empty(1, HIDDEN), torch.empty(1, HIDDEN)
    rows.append(
        (
            "skip_rmsnorm (1, 2048)",
            lambda: kernels.skip_rmsnorm(x, skip, weight, 1e-5, out=normed, sum_out=total),
            lambda: kernels.skip_rmsnorm_reference(x, skip, weight, 1e-5),
        )
    )

    q, cos, sin = randn(1, HEADS, HEAD_DIM), randn(1, HEAD_DIM // 2), randn(1, HEAD_DIM // 2)
    for interleaved, name in ((False, "half split"), (True, "interleaved")):
        rows.append(
            (
                f"rotary q (1, 32, 64), {name}",
                lambda i=interleaved: kernels.rotary(q, cos, sin, i, out=q),
                lambda i=interleaved: kernels.rotary_reference(q, cos, sin, i),
            )
        )

    gate, up, act = randn(1, INTERMEDIATE), randn(1, INTERMEDIATE), torch.empty(1, INTERMEDIATE)
    rows.append(
        (
            "silu_mul (1, 8192)",
            lambda: kernels.silu_mul(gate, up, out=act),
            lambda: kernels.silu_mul_reference(gate, up),
        )
    )
    rows.append(
        (
            "gelu_tanh (1, 8192)",
            lambda: kernels.gelu_tanh(gate, out=act),
            lambda: kernels.gelu_tanh_reference(gate),
        )
    )

    capacity = max(args.context, args.prefill) + 1
    k_cache, v_cache = randn(KV_HEADS, capacity, HEAD_DIM), randn(KV_HEADS, capacity, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    past = args.context - 1
    attn_out = torch.empty(1, HEADS, HEAD_DIM)
    sdpa_rows = []
    rows.append(
        (
            f"attention decode, T={args.context}",
            lambda: kernels.attention(q, k_cache, v_cache, past, scale, out=attn_out),
            lambda: kernels.attention_reference(q, k_cache, v_cache, past, scale),
        )
    )
    sdpa_rows.append((len(rows) - 1, lambda: sdpa(q, k_cache, v_cache, past)))
    q_prefill = randn(args.prefill, HEADS, HEAD_DIM)
    prefill_out = torch.empty_like(q_prefill)
    rows.append(
        (
            f"attention prefill, S={args.prefill}",
            lambda: kernels.attention(q_prefill, k_cache, v_cache, 0, scale, out=prefill_out),
            lambda: kernels.attention_reference(q_prefill, k_cache, v_cache, 0, scale),
        )
    )
    sdpa_rows.append((len(rows) - 1, lambda: sdpa(q_prefill, k_cache, v_cache, 0)))

    print(f"isa={kernels.isa()} threads={args.threads}  (microseconds per call)")
    print(f"{'kernel':36s} {'xcompile':>9s} {'torch ref':>10s} {'ref/ours':>9s} {'sdpa':>9s}")
    sdpa_for = dict(sdpa_rows)
    for index, (name, ours, reference) in enumerate(rows):
        t_ours, t_ref = microseconds(ours), microseconds(reference)
        line = f"{name:36s} {t_ours:9.1f} {t_ref:10.1f} {t_ref / t_ours:8.1f}x"
        if index in sdpa_for:
            t_sdpa = microseconds(sdpa_for[index])
            line += f" {t_sdpa:9.1f} ({t_sdpa / t_ours:.1f}x)"
        print(line)


if __name__ == "__main__":
    main()
