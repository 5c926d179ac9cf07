"""Two xrun builds side by side on the same artifacts: decode ms/token and prefill tokens/s of
each, runs alternating (A, B, A, B, ...) so that the shared host's swings hit both alike, each
run a fresh process with its --json figures, beside the machine's read bandwidth measured
between the rounds.

    python benchmarks/runtime_ab.py ARTIFACTS... --a PYTHON_A --b PYTHON_B [--rounds 3]
        [--tokens 64] [--prompt-tokens 128]

PYTHON_A / PYTHON_B: the interpreters of two environments holding xcompile (say, main's and a
branch's, or the torch-based and the slim one); each runs `PYTHON -m xcompile.runtime.cli`.
Prints best and median per cell, and B / A (above 1: B is faster). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import read_bandwidth  # noqa: E402

WORDS = [
    "the",
    "old",
    "lighthouse",
    "keeper",
    "walked",
    "along",
    "the",
    "shore",
    "and",
    "counted",
    "every",
    "wave",
]


def prompt_of(tokens: int) -> str:
    """About `tokens` tokens of plain text (a word is about a token in these tokenizers)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def run(python: str, artifacts: Path, prompt: str, tokens: int) -> dict:
    out = subprocess.run(  # outside the source tree: its xcompile/ would shadow an installed one
        [python, "-m", "xcompile.runtime.cli", str(artifacts.resolve()), "--prompt", prompt]
        + ["--max-new-tokens", str(tokens), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--a", required=True, help="python of build A")
    parser.add_argument("--b", required=True, help="python of build B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args()
    prompt = prompt_of(args.prompt_tokens)
    print(f"A = {args.a}\nB = {args.b}")
    header = f"{'artifacts':28s} {'':2s} {'decode ms/token best (median)':>30s} "
    print(header + f"{'prefill tok/s best (median)':>28s} {'GB/s':>11s}")
    for art in args.artifacts:
        figures = {"A": ([], []), "B": ([], [])}
        bandwidth = []
        for _ in range(args.rounds):
            for name, python in (("A", args.a), ("B", args.b)):
                report = run(python, art, prompt, args.tokens)
                figures[name][0].append(report["per_token_ms"])
                figures[name][1].append(report["prompt_tokens"] / report["prefill_ms"] * 1e3)
            bandwidth.append(read_bandwidth())
        best = {}
        for name in ("A", "B"):
            decode, prefill = figures[name]
            best[name] = (min(decode), max(prefill))
            print(
                f"{art.name:28s} {name:2s} {min(decode):17.2f} ({statistics.median(decode):7.2f}) "
                f"{max(prefill):18.1f} ({statistics.median(prefill):7.1f}) "
                f"{min(bandwidth):5.1f}-{max(bandwidth):4.1f}"
            )
        decode_ratio = best["A"][0] / best["B"][0]
        prefill_ratio = best["B"][1] / best["A"][1]
        print(f"{'':28s} B/A decode {decode_ratio:.3f}x, prefill {prefill_ratio:.3f}x")


if __name__ == "__main__":
    main()
