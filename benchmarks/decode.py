"""Decode speed of `xrun` beside transformers' eager generate and the machine's read bandwidth,
all measured in this run, alternating so that the shared host's swings hit every row alike.

    python benchmarks/decode.py MODEL_DIR [--variants bf16 bf16:primitive fp32] [--tokens 64]
                                         [--work DIR] [--ranks 1]

A variant is a weight format, optionally `:primitive` (compiled with --no-fuse). Each is compiled
from MODEL_DIR once (into --work), run by `xrun --json` in a fresh process, and its per_token_ms
read (the mean over every decode step, the two recorded before replays start included: see
runtime/replay.py); transformers runs in this process in FP32. GB/s = weight bytes read per
token (every matrix but the embedding table, which is read one row at a time) / time per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import read_bandwidth  # noqa: E402

from xcompile.artifacts import read_safetensors_header  # noqa: E402

PROMPT = "Once upon a time there was a small village by the sea"


def weight_bytes_per_token(artifacts: Path) -> int:
    """Bytes of weights one decode step reads, summed over ranks (the embedding table is read
    one row at a time, so it does not count unless it doubles as lm_head)."""
    total = 0
    for shard in sorted(artifacts.glob("rank*.safetensors")):
        header = read_safetensors_header(shard)
        tied = not any(name.startswith("lm_head") for name in header)
        for name, info in header.items():
            if "embed_tokens" in name or name.endswith("wte.weight"):
                total += info.nbytes if tied else 0
            else:
                total += info.nbytes
    return total


def xrun_ms(artifacts: Path, tokens: int, threads: int) -> tuple[float, float | None]:
    """(ms per token, share of the step in AllReduce for sharded artifacts)"""
    import os

    sharded = json.loads((artifacts / "manifest.json").read_text())["ranks"] > 1
    env = dict(os.environ, **({"XCOMPILE_PROFILE": "1"} if sharded else {}))
    cmd = ["xrun", str(artifacts), "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--json"]
    if not sharded:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    share = None
    if sharded:  # profiled run: its own timing is slower, so time a second, plain run
        profile = out["profile_ms"]
        share = profile.get("AllReduce", 0.0) / sum(profile.values())
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["per_token_ms"], share


class Int8PackLinear:
    """torch's own weight-only INT8 decode path: aten._weight_int8pack_mm (per-channel)."""

    def __init__(self, linear):
        import torch

        w = linear.weight.detach().float()
        self.scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.w = torch.round(w / self.scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.bias = linear.bias

    def __call__(self, x):
        import torch

        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.w, self.scales)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def transformers_ms(model_dir: Path, tokens: int, threads: int, int8: bool = False) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    if int8:  # every projection but lm_head through aten._weight_int8pack_mm
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.forward = Int8PackLinear(module)
        model.lm_head.to(torch.bfloat16)
        head = model.lm_head
        head.forward = lambda x, head=head: torch.nn.functional.linear(
            x.to(torch.bfloat16), head.weight
        ).float()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)
    return (run(tokens + 1) - run(1)) / tokens * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument(
        "--variants", nargs="+", default=["bf16", "bf16:primitive", "int8", "int4", "fp32"]
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument(
        "--torch-int8",
        action="store_true",
        help="also torch's aten._weight_int8pack_mm on the transformers model",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="also run each fused variant sharded for this many ranks",
    )
    args = parser.parse_args()

    args.work.mkdir(exist_ok=True)
    arts = {}
    for variant in args.variants:
        dtype, _, graph = variant.partition(":")
        arts[variant] = args.work / f"{args.model.name}-{dtype}{'-' + graph if graph else ''}"
        if not (arts[variant] / "manifest.json").is_file():
            subprocess.run(
                [
                    "xcompile",
                    "quantize",
                    str(args.model),
                    "-o",
                    str(arts[variant]),
                    f"--{dtype}",
                    *(["--no-fuse"] if graph == "primitive" else []),
                ],
                check=True,
            )

    if args.ranks > 1:
        for variant in [v for v in args.variants if ":" not in v]:
            tp = args.work / f"{arts[variant].name}-tp{args.ranks}"
            if not (tp / "manifest.json").is_file():
                subprocess.run(
                    [
                        "xcompile",
                        "shard",
                        str(arts[variant]),
                        "--ranks",
                        str(args.ranks),
                        "-o",
                        str(tp),
                    ],
                    check=True,
                )
            arts[f"{variant}:tp{args.ranks}"] = tp

    rows: dict[str, list[float]] = {}
    shares: dict[str, float] = {}
    bws: list[float] = []
    for _ in range(args.repeats):  # alternate: bandwidth, each variant, bandwidth ...
        for variant in arts:
            bws.append(read_bandwidth(args.threads))
            ms, share = xrun_ms(arts[variant], args.tokens, args.threads)
            rows.setdefault(f"xrun {variant}", []).append(ms)
            if share is not None:
                shares[f"xrun {variant}"] = share
    if args.torch_int8:
        bws.append(read_bandwidth(args.threads))
        rows["torch int8pack_mm"] = [
            transformers_ms(args.model, args.tokens, args.threads, int8=True)
        ]
    if not args.no_transformers:
        bws.append(read_bandwidth(args.threads))
        rows["transformers eager fp32"] = [transformers_ms(args.model, args.tokens, args.threads)]

    bw = max(bws)
    print(
        f"read bandwidth ({args.threads} threads): best {bw:.1f} GB/s, "
        f"range {min(bws):.1f}-{max(bws):.1f} over {len(bws)} passes"
    )
    print(f"{'':26s} {'ms/token':>9s} {'GB/s':>7s} {'of bw':>6s} {'floor ms':>9s}")
    for name, times in rows.items():
        variant = {"transformers eager fp32": "fp32", "torch int8pack_mm": "int8"}.get(
            name, name.split()[-1]
        )
        if variant in arts:
            nbytes = weight_bytes_per_token(arts[variant])
        else:
            nbytes = 0
        ms = min(times)
        gbs = nbytes / (ms / 1e3) / 1e9
        extra = f"  allreduce {shares[name]:.0%} of the step" if name in shares else ""
        print(f"{name:26s} {ms:9.1f} {gbs:7.1f} {gbs / bw:6.0%} {nbytes / bw / 1e6:9.1f}{extra}")


if __name__ == "__main__":
    main()
