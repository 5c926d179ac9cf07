"""Artifacts for the serving benchmarks (serve.py, beam.py): the folders given, or, when none is,
compiled from xcompile's seeded toy checkpoint, so a benchmark runs on any machine:

    python -m xcompile.toy llama WORK/toy-llama-SIZE --size SIZE       # tiny, or 1b (1.1B)
    xcompile quantize WORK/toy-llama-SIZE -o WORK/toy-llama-SIZE-DTYPE --DTYPE

Both steps are cached in WORK (a folder with a manifest is reused as it is).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, dtypes: list[str]) -> None:
    """ARTIFACTS (any number), else --toy SIZE compiled to each of --dtypes into --work."""
    parser.add_argument(
        "artifacts", type=Path, nargs="*", help="compiled artifacts (default: a toy, see --toy)"
    )
    parser.add_argument(
        "--toy",
        choices=["tiny", "1b"],
        default="tiny",
        help="without ARTIFACTS: the toy llama of this size (1b: the issue's 1.1B)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=dtypes, help="without ARTIFACTS: the toy's formats"
    )
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="toys' folder")


def artifacts_from(args: argparse.Namespace) -> list[Path]:
    """args.artifacts, checked, or the toy compiled to each of args.dtypes."""
    for art in args.artifacts:
        if not (art / "manifest.json").is_file():
            raise SystemExit(f"{art}: no manifest.json; give compiled artifacts or leave it out")
    if args.artifacts:
        return args.artifacts
    return [toy_artifacts(args.toy, dtype, args.work) for dtype in args.dtypes]


def toy_artifacts(size: str, dtype: str, work: Path) -> Path:
    """WORK/toy-llama-SIZE-DTYPE, compiled (once) from the seeded toy checkpoint."""
    checkpoint = work / f"toy-llama-{size}"
    out = work / f"toy-llama-{size}-{dtype}"
    if not (checkpoint / "config.json").is_file():
        run([sys.executable, "-m", "xcompile.toy", "llama", str(checkpoint), "--size", size])
    if not (out / "manifest.json").is_file():
        run([sys.executable, "-m", "xcompile.cli", "quantize", str(checkpoint), "-o", str(out),
             f"--{dtype}"])  # fmt: skip
    return out


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd[1:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
