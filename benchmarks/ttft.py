"""Time to first token of `xrun`, from process start (imports, load, plan, prefill), and the
process's peak RSS beside the size of its shard, warm page cache, in one run; llama.cpp's
`llama-cli -n 1` beside it when given a GGUF.

    python benchmarks/ttft.py ARTIFACTS [--weights copy map] [--repeats 3]
    python benchmarks/ttft.py ARTIFACTS --python .ci-venv/bin/python .ci-slim-venv/bin/python \\
        --gguf model.gguf    # xrun with torch installed / the base install, and llama-cli

Each run starts a fresh process and stops the clock at the first byte of the first token's text:
xrun's first printed byte (`--prompt ... --max-new-tokens 1`); llama-cli's first byte after it
echoes the prompt (`> PROMPT`: it is a chat now, so it also wraps the prompt in the model's chat
template, a few tokens more to prefill). Peak RSS is the child's own (wait4's rusage). One run
of each before the timed ones warms the page cache; the timed runs go round the commands in
turn, so a noisy neighbour hits them alike. Print only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

PROMPT = "Once upon a time there was a small village by the sea"
LLAMA_CLI = Path(__file__).resolve().parents[1] / "build" / "llama.cpp" / "build" / "bin"


def first_token_seconds(cmd: list[str], after: bytes = b"") -> tuple[float, int]:
    """(seconds from start to the first byte printed after `after`, the child's peak RSS in
    bytes)"""
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # cwd: not a source tree, whose xcompile/ `-m` would import
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/"
    )
    seen = b""
    while after not in seen:  # the echo of the prompt, byte by byte (it is short)
        byte = proc.stdout.read(1)
        if not byte:
            raise SystemExit(f"{cmd[0]}: exited before {after!r}; output: {seen[-300:]!r}")
        seen += byte
    if not proc.stdout.read(1):
        raise SystemExit(f"{cmd[0]}: no token printed: {' '.join(cmd)}")
    seconds = time.perf_counter() - t0
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]}: exit {proc.returncode}: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024


def xrun_command(python: str | None, root: Path, weights: str) -> list[str]:
    """`xrun` on PATH, or PYTHON -m xcompile.runtime.cli (the xrun of PYTHON's environment)."""
    xrun = (
        ["xrun"] if python is None else [str(Path(python).absolute()), "-m", "xcompile.runtime.cli"]
    )
    return xrun + [str(root), "--prompt", PROMPT, "--max-new-tokens", "1", "--weights", weights]


def llama_cli_command(llama_cli: str, gguf: Path) -> list[str]:
    threads = len(os.sched_getaffinity(0))  # as xrun: every allowed core
    return [llama_cli, "-m", str(gguf), "-p", PROMPT, "-n", "1", "-st", "--no-display-prompt"] + [
        "--simple-io",
        "-t",
        str(threads),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--weights", nargs="+", default=["copy", "map"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--python",
        nargs="+",
        default=[None],
        help="interpreters whose environment's xrun to time (default: xrun on PATH)",
    )
    parser.add_argument("--gguf", type=Path, help="time llama-cli -n 1 on this GGUF beside")
    parser.add_argument(
        "--llama-cli", default=str(LLAMA_CLI / "llama-cli"), help="default: benchmarks/llamacpp's"
    )
    args = parser.parse_args()
    args.artifacts = args.artifacts.resolve()
    runs: dict[str, tuple[list[str], bytes]] = {}  # label -> (command, what precedes the token)
    for python in args.python:
        env = "xrun" if python is None else Path(python).absolute().parents[1].name
        for weights in args.weights:
            runs[f"{env} --weights {weights}"] = (
                xrun_command(python, args.artifacts, weights),
                b"",
            )
    if args.gguf is not None:
        llama_cli = shutil.which(args.llama_cli) or args.llama_cli
        runs[f"llama-cli {args.gguf.name}"] = (
            llama_cli_command(llama_cli, args.gguf.resolve()),
            f"> {PROMPT}\n".encode(),
        )

    shard = sum(p.stat().st_size for p in args.artifacts.glob("rank0.safetensors"))
    for cmd, after in runs.values():  # warm the page cache (and check each command runs)
        first_token_seconds(cmd, after)
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    peaks: dict[str, list[int]] = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, (cmd, after) in runs.items():
            s, peak = first_token_seconds(cmd, after)
            seconds[label].append(s)
            peaks[label].append(peak)
    print(f"{args.artifacts}: rank-0 shard {shard / 1e6:.0f} MB, {os.cpu_count()} cpus")
    width = max(len(label) for label in runs)
    print(f"{'':{width}s} {'first token s (best)':>21s} {'all runs':>24s} {'peak RSS MB':>12s}")
    for label in runs:
        print(
            f"{label:{width}s} {min(seconds[label]):21.2f} "
            f"{' '.join(f'{r:.2f}' for r in seconds[label]):>24s} {max(peaks[label]) / 1e6:12.0f}"
        )


if __name__ == "__main__":
    main()
