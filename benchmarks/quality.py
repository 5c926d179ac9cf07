"""Quality beside llama.cpp: perplexity of every format and algorithm on a real model.

    python benchmarks/quality.py                      # SmolLM2-135M, held-out text, 16 chunks
    python benchmarks/quality.py --only int4 --chunks 4
    python benchmarks/quality.py --checkpoint DIR --text FILE

xcompile's rows: `xcompile quantize` (its seconds and peak RSS) then `xrun --perplexity --json`.
llama.cpp's rows: the same checkpoint converted by its convert_hf_to_gguf.py, quantized by
llama-quantize, scored by llama-perplexity (benchmarks/llamacpp.py builds them from the
llama-cpp-python sdist). Both score alike: 512-token chunks from an empty cache, the second half
of each scored. "vs FP32" is against the same runtime's own FP32, so each column compares
quantizers, not runtimes. The default model is the suite's real one (xcompile/real_model.py), its
text the Python language reference's topics (real_model.held_out_text: in no calibration text).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from llamacpp import LlamaCpp  # noqa: E402

# label -> xcompile quantize flags; the first words of a label name its group for --only
VARIANTS = {
    "fp32": ["--fp32"],
    "bf16": ["--bf16"],
    "int8": ["--int8"],  # the lm_head too, in blocks of 32
    "int8, BF16 lm_head": ["--int8", "--no-quantize-lm-head"],
    "int8, float32 scales": ["--int8", "--scales", "float32"],  # the default before fp16 scales
    "int8 g64": ["--int8", "--group-size", "64"],
    "int8 g128": ["--int8", "--group-size", "128"],
    "int4 (default recipe)": ["--int4"],
    "int4 default, float32 scales": ["--int4", "--scales", "float32"],
    "int4 g32 float offsets, searched, uniform": ["--int4", "--plan", "uniform"],
    "int4 g128 sym INC RTN (the old default)": [
        "--int4", "--group-size", "128", "--sym", "--no-search", "--plan", "uniform"
    ],
    "int4 g128 sym searched": ["--int4", "--group-size", "128", "--sym", "--plan", "uniform"],
    "int4 g128 sym searched, mixed": ["--int4", "--group-size", "128", "--sym"],
    "int4 g128 sym gptq": [
        "--int4", "--group-size", "128", "--sym", "--plan", "uniform", "--algo", "gptq"
    ],
    "int4 g128 sym awq": [
        "--int4", "--group-size", "128", "--sym", "--plan", "uniform", "--algo", "awq"
    ],
    "int4 g32 sym searched, mixed": ["--int4", "--sym"],
    "int4 g64 sym searched, mixed": ["--int4", "--group-size", "64", "--sym"],
    "int4 g32 sym searched, head8": ["--int4", "--sym", "--plan", "head8"],  # Q4_0's recipe
    "int4 g32 sym searched, head8, float32 scales": [
        "--int4", "--sym", "--plan", "head8", "--scales", "float32",
    ],  # fmt: skip
    "int4 g64 sym searched, head8": ["--int4", "--group-size", "64", "--sym", "--plan", "head8"],
    "int4 g64 float offsets searched, head8": [
        "--int4", "--group-size", "64", "--plan", "head8"
    ],
    "int4 g64 sym gptq, head8": [
        "--int4", "--group-size", "64", "--sym", "--plan", "head8", "--algo", "gptq"
    ],
    "int4 g64 sym awq, head8": [
        "--int4", "--group-size", "64", "--sym", "--plan", "head8", "--algo", "awq"
    ],
    "int4 g64 asym uint8 offsets, head8": [
        "--int4", "--group-size", "64", "--asym", "--zero-points", "uint8", "--no-search",
        "--plan", "head8"
    ],
    "int4 g32 sym searched, uniform, lm_head": [
        "--int4", "--sym", "--plan", "uniform", "--quantize-lm-head"
    ],
    "int4 g64 sym searched, uniform, lm_head": [
        "--int4", "--group-size", "64", "--sym", "--plan", "uniform", "--quantize-lm-head"
    ],
    "int4 default + gptq": ["--int4", "--algo", "gptq"],
    "int4 default + awq": ["--int4", "--algo", "awq"],
}  # fmt: skip
PEERS = ("f32", "q8_0", "q4_0", "q4_k_m")

MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stderr[-3000:])
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def compile_measured(checkpoint: Path, out: Path, flags: list[str]) -> tuple[float, float]:
    """xcompile quantize in a process of its own -> (seconds, peak RSS in MB)."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    xcompile = Path(sys.executable).with_name("xcompile")
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(xcompile), "quantize", str(checkpoint), "-o",
         str(out), *flags],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"xcompile quantize {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    seconds, kb = done.stdout.split()
    return float(seconds), float(kb) / 1024


def xrun_perplexity(artifacts: Path, text: Path, ctx: int, chunks: int) -> dict:
    xrun = Path(sys.executable).with_name("xrun")
    done = subprocess.run(
        [str(xrun), str(artifacts), "--perplexity", str(text), "--ctx", str(ctx),
         "--chunks", str(chunks), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="HF FP32 checkpoint (default: SmolLM2-135M)")
    p.add_argument("--text", type=Path, help="held-out text (default: real_model.held_out_text)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--only", nargs="*", help="labels starting with these words (e.g. int4 fp32)")
    p.add_argument("--no-peers", action="store_true", help="skip llama.cpp's rows")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "quality")
    args = p.parse_args()

    from xcompile import real_model

    checkpoint = args.checkpoint or real_model.build(ROOT / "build" / "real" / "smollm2-135m")
    text = args.text
    if text is None:
        text = ROOT / "build" / "real" / "heldout.txt"
        text.write_text(real_model.held_out_text(), encoding="utf-8")
    rows = []  # (runtime, label, ppl, err, weights MB, compile s, peak MB, isa)
    for label, flags in VARIANTS.items():
        if args.only and not any(label.startswith(w) for w in args.only) and label != "fp32":
            continue
        out = args.work / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        seconds, peak = compile_measured(checkpoint, out, flags)
        result = xrun_perplexity(out, text, args.ctx, args.chunks)
        rows.append(("xcompile", label, result["ppl"], result["ppl_stderr"], size_mb(out),
                     seconds, peak, result["isa"]))  # fmt: skip
        print(f"  {label}: PPL {result['ppl']:.4f} ({seconds:.0f} s to compile)", file=sys.stderr)
    if not args.no_peers:
        tools = LlamaCpp.build()
        f32 = tools.convert(checkpoint, "f32")
        for kind in PEERS:
            gguf = f32 if kind == "f32" else tools.quantize(f32, kind)
            ppl, err = tools.perplexity(gguf, text, args.ctx, args.chunks)
            size = gguf.stat().st_size / 1e6
            rows.append(("llama.cpp", kind.upper(), ppl, err, size, None, None, None))
            print(f"  llama.cpp {kind}: PPL {ppl:.4f}", file=sys.stderr)
    own = {rt: ppl for rt, label, ppl, *_ in rows if label in ("fp32", "F32")}
    isa = next((r[-1] for r in rows if r[0] == "xcompile"), "?")
    print(f"\n{checkpoint.name}, {text.name}: ctx {args.ctx}, {args.chunks} chunks; xrun's "
          f"kernels {isa}; {time.ctime()}")  # fmt: skip
    print("\n| runtime | weights | PPL | vs its FP32 | file MB | compile s | compile peak MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for rt, label, ppl, err, size, seconds, peak, _ in rows:
        delta = f"{(ppl / own[rt] - 1) * 100:+.2f} %" if rt in own else "?"
        sec = f"{seconds:.0f}" if seconds is not None else ""
        mb = f"{peak:.0f}" if peak is not None else ""
        print(f"| {rt} | {label} | {ppl:.4f} ± {err:.3f} | {delta} | {size:.1f} | {sec} | {mb} |")


if __name__ == "__main__":
    main()
