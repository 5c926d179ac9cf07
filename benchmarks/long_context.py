"""Decode at long context: the KV cache in FP32 beside BF16, and decode attention split over keys
(flash-decoding) beside one pass, all measured in this run, alternating round by round so the
shared host's swings hit every row alike.

    python benchmarks/long_context.py [MODEL] [--context 2048] [--threads 2] [--dtype int8]
                                      [--rounds 7] [--steps 16] [--work DIR]

1. The attention kernel alone: one layer's decode step (S = 1) over `context` keys, cycling
   through --layers layers' caches (from memory, as in a decode step), for
   TinyLlama-1.1B's heads (32 query heads, 4 KV heads of 64) and SmolLM2-135M's (9 over 3, which
   2 threads split 2 + 1 without the split over keys): us per call, fp32 / bf16 cache x split /
   one pass (_C.set_attention_split).
2. A model: decode steps at positions context .. context + steps - 1 after a prefill of
   `context` tokens, the same model loaded with `--kv-cache float32` and `bfloat16`, attention
   split or in one pass: ms per token.
   MODEL is an artifacts folder (used as it is) or a checkpoint (compiled as --dtype into
   --work); without it, a toy Llama with TinyLlama's attention (hidden 2048, 32 heads, 4 KV heads)
   and 4 layers of intermediate 2048 is made (xcompile.toy), max_position_embeddings context +
   steps. Its weights are a fifth of TinyLlama's, so the cache's share of a step is larger here.
Figures are the median over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# as the runtime does (runtime/__init__.py): passive OpenMP waiting, set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# this folder's kernels.py would shadow the `kernels` package transformers imports (the toy)
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from xcompile import _C  # noqa: E402
from xcompile.runtime import kernels  # noqa: E402

HEAD_SHAPES = {"TinyLlama 32/4 x 64": (32, 4, 64), "SmolLM2 9/3 x 64": (9, 3, 64)}


def kernel_rows(context: int, rounds: int, layers: int, passes: int = 5) -> None:
    """us per layer: every pass runs the layers' caches in turn, as a decode step does, so they
    come from memory (22 layers of TinyLlama at 2048 are 88 MB fp32), not from the L3."""
    print(
        f"attention, one decode step (S = 1) at {context} keys, {layers} layers' caches in turn, "
        f"{kernels.num_threads()} threads: us per layer"
    )
    print(f"{'heads':>22} {'cache':>9} {'one pass us':>12} {'split us':>9} {'split x':>8}")
    for name, (heads, kv_heads, d) in HEAD_SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, d, generator=gen)
        out = torch.empty_like(q)
        wide = [torch.randn(2, kv_heads, context, d, generator=gen) for _ in range(layers)]
        caches = {"float32": wide, "bfloat16": [kv.bfloat16() for kv in wide]}
        times = {(c, s): [] for c in caches for s in (False, True)}
        for _ in range(rounds):
            for cache, split in times:
                _C.set_attention_split(split)
                t0 = time.perf_counter()
                for _ in range(passes):
                    for kv in caches[cache]:
                        kernels.attention(q, kv[0], kv[1], context - 1, d**-0.5, out=out)
                times[cache, split].append((time.perf_counter() - t0) / passes / layers * 1e6)
        _C.set_attention_split(True)
        for cache in caches:
            one, split = (statistics.median(times[cache, s]) for s in (False, True))
            print(f"{name:>22} {cache:>9} {one:12.1f} {split:9.1f} {one / split:8.2f}")
        fp32, bf16 = (statistics.median(times[c, True]) for c in caches)
        print(f"{'':>22} bf16 cache vs fp32, both split: {fp32 / bf16:.2f}x")


def toy_artifacts(work: Path, context: int, dtype: str) -> Path:
    from xcompile.quantize import quantize
    from xcompile.toy import make_checkpoint

    ckpt = make_checkpoint(
        "llama",
        work / "ckpt",
        size="1b",
        num_hidden_layers=4,
        intermediate_size=2048,
        vocab_size=512,
        max_position_embeddings=context,
    )
    out = work / f"art-{dtype}"
    quantize(ckpt, out, dtype, progress=False)
    return out


def model_rows(art: Path, context: int, steps: int, rounds: int) -> None:
    from xcompile.runtime.model import Model

    models = {c: Model.load(art, kv_cache=c) for c in ("float32", "bfloat16")}
    caches, ids = {}, [int(i) for i in torch.randint(3, 500, (context,)).tolist()]
    for choice, model in models.items():
        caches[choice] = model.new_cache(context + steps)
        model.forward(ids, 0, caches[choice], last_only=True)
    times = {(c, split): [] for c in models for split in (True, False)}
    for r in range(rounds + 1):  # round 0 records the replayed steps: not counted
        for choice, split in times:
            _C.set_attention_split(split)
            t0 = time.perf_counter()
            for i in range(steps):
                models[choice].forward([ids[i]], context + i, caches[choice], last_only=True)
            if r:
                times[choice, split].append((time.perf_counter() - t0) / steps * 1e3)
    _C.set_attention_split(True)
    manifest = models["float32"].manifest
    print(f"\n{art} ({manifest.dtype}), decode at {context}..{context + steps - 1} of context")
    for split in (True, False):
        fp32, bf16 = (statistics.median(times[c, split]) for c in ("float32", "bfloat16"))
        print(
            f"  ms/token, attention {'split' if split else 'one pass'}: fp32 cache {fp32:.2f}, "
            f"bf16 cache {bf16:.2f} ({fp32 / bf16:.3f}x)"
        )
    nbytes = {c: caches[c].nbytes * context / (context + steps) for c in caches}
    print(f"  cache read per token: fp32 {nbytes['float32'] / 2**20:.1f} MiB, "
          f"bf16 {nbytes['bfloat16'] / 2**20:.1f} MiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="artifacts or checkpoint (default: a toy)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="int8", choices=["bf16", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=22, help="caches the kernel rows cycle")
    parser.add_argument("--kernel-only", action="store_true")
    args = parser.parse_args()
    kernels.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    kernel_rows(args.context, args.rounds, args.layers)
    if args.kernel_only:
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="long-context-"))
    if args.model is None:
        art = toy_artifacts(work, args.context + args.steps, args.dtype)
    elif (Path(args.model) / "manifest.json").is_file():
        art = Path(args.model)
    else:
        from xcompile.quantize import quantize

        art = work / f"art-{args.dtype}"
        if not (art / "manifest.json").is_file():
            quantize(Path(args.model), art, args.dtype, progress=False)
    with torch.inference_mode():
        model_rows(art, args.context, args.steps, args.rounds)


if __name__ == "__main__":
    main()
