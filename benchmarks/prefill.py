"""Prefill speed: a 128-token prompt through `xrun`'s model, in tokens/s, beside torch's own BF16
matmul on the same projection shapes (the compute floor of a prefill), all in one run.

    python benchmarks/prefill.py ARTIFACTS [ARTIFACTS ...] [--tokens 128] [--threads 2]

For each artifact folder: Model.load, one warm-up, then the best of --repeats forwards of
--tokens new tokens (logits of the last row only, as generation asks). The torch reference runs
x (tokens, K) @ W (N, K).T in BF16 (torch.matmul, oneDNN: AMX where the CPU has it) for every
projection of the model's graph (the artifacts' own weight shapes), so "of torch" is the
share of torch's matmul speed the whole prefill reaches, attention and norms included.
Print only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from xcompile.runtime import kernels
from xcompile.runtime.model import Model


def projection_shapes(root: Path) -> list[tuple[int, int]]:
    """(N, K) of every projection the graph runs per token (quantized or not), lm_head once."""
    import onnx

    graph = onnx.load(str(root / "model.onnx"), load_external_data=False).graph
    dims = {i.name: tuple(i.dims) for i in graph.initializer}
    for node in graph.node:  # BF16 weights reach their Transpose through a Cast
        if node.op_type == "Cast" and node.input[0] in dims:
            dims[node.output[0]] = dims[node.input[0]]
    shapes = []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            shapes.append((attrs["N"], attrs["K"]))
        elif node.op_type == "Transpose" and node.input[0] in dims:
            n, k = dims[node.input[0]][:2]
            if "embed" not in node.input[0]:
                shapes.append((n, k))
    return shapes


def torch_bf16_seconds(shapes: list[tuple[int, int]], tokens: int, repeats: int) -> float:
    weights = {s: torch.randn(s, dtype=torch.bfloat16) for s in set(shapes)}
    xs = {k: torch.randn(tokens, k, dtype=torch.bfloat16) for _, k in set(shapes)}

    def once() -> float:
        t0 = time.perf_counter()
        for n, k in shapes:
            torch.matmul(xs[k], weights[n, k].T)
        return time.perf_counter() - t0

    once()
    return min(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    ids = [100 + i % 1000 for i in range(args.tokens)]
    print(f"isa={kernels.isa()} threads={args.threads} prompt={args.tokens} tokens")
    print(f"{'':34s} {'s':>7s} {'tokens/s':>9s} {'torch bf16 matmul':>18s} {'of torch':>9s}")
    for root in args.artifacts:
        model = Model.load(root)
        cache = model.new_cache(args.tokens + 1)
        model.forward(ids[:8], 0, cache, last_only=True)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.forward(ids, 0, cache, last_only=True)
            best = min(best, time.perf_counter() - t0)
        ref = torch_bf16_seconds(projection_shapes(root), args.tokens, args.repeats)
        dtype = json.loads((root / "manifest.json").read_text())["dtype"]
        name = f"xrun {root.name} ({dtype})"
        print(
            f"{name:34s} {best:7.2f} {args.tokens / best:9.1f} "
            f"{args.tokens / ref:14.1f} t/s {ref / best:8.0%}"
        )
        del model, cache


if __name__ == "__main__":
    main()
