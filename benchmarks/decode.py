"""Decode speed of `xrun` beside transformers' eager generate and the machine's read bandwidth,
all measured in this run, alternating so that the shared host's swings hit every row alike.

    python benchmarks/decode.py MODEL_DIR [--variants bf16 bf16:primitive fp32] [--tokens 32]
                                         [--work DIR] [--ranks 1]

A variant is a weight format, optionally `:primitive` (compiled with --no-fuse). Each is compiled
from MODEL_DIR once (into --work), run by `xrun --json` in a fresh process, and its per_token_ms
read; transformers runs in this process in FP32. GB/s = weight bytes read per
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
    header = read_safetensors_header(artifacts / "rank0.safetensors")
    tied = not any(name.startswith("lm_head") for name in header)
    total = 0
    for name, info in header.items():
        if "embed_tokens" in name or name.endswith("wte.weight"):
            total += info.nbytes if tied else 0
        else:
            total += info.nbytes
    return total


def xrun_ms(artifacts: Path, tokens: int, threads: int) -> float:
    proc = subprocess.run(
        ["xrun", str(artifacts), "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--json",
         "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["per_token_ms"]


def transformers_ms(model_dir: Path, tokens: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - t0

    run(2)
    return (run(tokens + 1) - run(1)) / tokens * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--variants", nargs="+", default=["bf16", "bf16:primitive", "fp32"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    args.work.mkdir(exist_ok=True)
    arts = {}
    for variant in args.variants:
        dtype, _, graph = variant.partition(":")
        arts[variant] = args.work / f"{args.model.name}-{dtype}{'-' + graph if graph else ''}"
        if not (arts[variant] / "manifest.json").is_file():
            subprocess.run(["xcompile", "quantize", str(args.model), "-o", str(arts[variant]),
                            f"--{dtype}", *(["--no-fuse"] if graph == "primitive" else [])],
                           check=True)

    rows: dict[str, list[float]] = {}
    bws: list[float] = []
    for _ in range(args.repeats):  # alternate: bandwidth, each variant, bandwidth ...
        for variant in args.variants:
            bws.append(read_bandwidth(args.threads))
            rows.setdefault(f"xrun {variant}", []).append(xrun_ms(arts[variant], args.tokens,
                                                                  args.threads))
    if not args.no_transformers:
        bws.append(read_bandwidth(args.threads))
        rows["transformers eager fp32"] = [transformers_ms(args.model, args.tokens, args.threads)]

    bw = max(bws)
    print(f"read bandwidth ({args.threads} threads): best {bw:.1f} GB/s, "
          f"range {min(bws):.1f}-{max(bws):.1f} over {len(bws)} passes")
    print(f"{'':26s} {'ms/token':>9s} {'GB/s':>7s} {'of bw':>6s} {'floor ms':>9s}")
    for name, times in rows.items():
        variant = "fp32" if "transformers" in name else name.split()[-1]
        if variant in arts:
            nbytes = weight_bytes_per_token(arts[variant])
        else:  # transformers fp32 without fp32 artifacts: twice the bf16 bytes
            nbytes = 2 * weight_bytes_per_token(next(iter(arts.values())))
        ms = min(times)
        gbs = nbytes / (ms / 1e3) / 1e9
        print(f"{name:26s} {ms:9.1f} {gbs:7.1f} {gbs / bw:6.0%} {nbytes / bw / 1e6:9.1f}")


if __name__ == "__main__":
    main()
