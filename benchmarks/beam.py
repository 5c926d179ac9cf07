"""Beam search's cost per step beside greedy decoding, on the same artifacts, with the machine's
read bandwidth measured in the same run (alternating, so the shared host's swings hit every row).

    python benchmarks/beam.py [ARTIFACTS ...] [--beams 4] [--tokens 32] [--threads 2] [--repeats 2]
    python benchmarks/beam.py --toy 1b --dtypes int8 bf16    # the 1.1B toy, compiled once

Without ARTIFACTS it compiles the toy llama (--toy tiny or 1b) to each of --dtypes (default
int8 bf16) into --work once (benchmarks/toy_artifacts.py).

Each row runs `xrun --json` in a fresh process twice: greedy (--beams 1 --temperature 0) and
--beams B, and reads per_token_ms (a decode step: one new token, for one sequence or for all B
beams at once). Decode is memory-bound and a beam step reads the weights once for all B beams,
so the ideal ratio is 1; GB/s = weight bytes read per step / time per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import read_bandwidth  # noqa: E402
from decode import PROMPT, weight_bytes_per_token  # noqa: E402
from toy_artifacts import add_arguments, artifacts_from  # noqa: E402


def xrun_step_ms(artifacts: Path, beams: int, tokens: int, threads: int) -> dict:
    """xrun's --json object for one run with `beams` beams (1: greedy)."""
    cmd = [
        sys.executable,
        "-m",
        "xcompile.runtime.cli",
        str(artifacts),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        str(tokens),
        "--temperature",
        "0",
        "--beams",
        str(beams),
        "--json",
    ]
    if json.loads((artifacts / "manifest.json").read_text())["ranks"] == 1:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, ["int8", "bf16"])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.artifacts = artifacts_from(args)

    greedy: dict[Path, list[float]] = {}
    beam: dict[Path, list[float]] = {}
    steps: dict[Path, int] = {}
    bws: list[float] = []
    for _ in range(args.repeats):
        for art in args.artifacts:
            bws.append(read_bandwidth(args.threads))
            greedy.setdefault(art, []).append(
                xrun_step_ms(art, 1, args.tokens, args.threads)["per_token_ms"]
            )
            out = xrun_step_ms(art, args.beams, args.tokens, args.threads)
            beam.setdefault(art, []).append(out["per_token_ms"])
            steps[art] = len(out["tokens"])

    bw = max(bws)
    print(
        f"read bandwidth ({args.threads} threads): best {bw:.1f} GB/s, "
        f"range {min(bws):.1f}-{max(bws):.1f} over {len(bws)} passes"
    )
    b = args.beams
    print(
        f"{'artifacts':28s} {'greedy ms':>10s} {f'beams={b} ms':>11s} {'ratio':>6s} "
        f"{'greedy GB/s':>12s} {'beam GB/s':>10s} {'of bw':>6s} {'best len':>9s}"
    )
    for art in args.artifacts:
        nbytes = weight_bytes_per_token(art)
        g, s = min(greedy[art]), min(beam[art])
        g_gbs, s_gbs = nbytes / (g / 1e3) / 1e9, nbytes / (s / 1e3) / 1e9
        print(
            f"{art.name:28s} {g:10.1f} {s:11.1f} {s / g:6.2f} "
            f"{g_gbs:12.1f} {s_gbs:10.1f} {s_gbs / bw:6.0%} {steps[art]:9d}"
        )


if __name__ == "__main__":
    main()
