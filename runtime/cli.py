"""`xrun`: run compiled artifacts.

    xrun ARTIFACTS --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                   [--seed S] [--bind-cores/--no-bind-cores] [--core-list L]
                   [--backend shm|torch] [--json] [--verbose]

Text streams to stdout as it is made; --json prints one object at the end instead. Sharded
artifacts run one process per rank (runtime/launch.py); with --backend torch each rank is a
process that torchrun started. The runtime imports none of the compile-time packages.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from xcompile.errors import UserError, run_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _sampling_defaults(root: Path) -> dict:
    """generation_config.json's sampling settings, as transformers' generate would use them."""
    try:
        g = json.loads((root / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not g.get("do_sample"):
        return {}
    return {
        k: g[k] for k in ("temperature", "top_k", "top_p") if isinstance(g.get(k), (int, float))
    }


@app.command()
def run(
    artifacts_dir: Path = typer.Argument(..., metavar="ARTIFACTS", help="Artifacts folder."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(
        128, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."
    ),
    temperature: float = typer.Option(
        None,
        "--temperature",
        min=0.0,
        help="0 is greedy (default unless generation_config samples).",
    ),
    top_k: int = typer.Option(
        None, "--top-k", min=0, help="Sample among the K likeliest (0: all)."
    ),
    top_p: float = typer.Option(
        None, "--top-p", min=0.0, max=1.0, help="Sample within probability mass P."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    threads: int = typer.Option(
        None, "--threads", min=1, help="Threads per rank (default: the rank's cores)."
    ),
    bind_cores: bool = typer.Option(
        None,
        "--bind-cores/--no-bind-cores",
        help="Pin each rank to its own cores (default: on when "
        "there are at least as many cores as ranks).",
    ),
    core_list: str = typer.Option(None, "--core-list", help="Cores per rank, e.g. '0-27|28-55'."),
    backend: str = typer.Option(
        "shm",
        "--backend",
        help="Collectives: shm (one machine) or torch (torch.distributed under torchrun).",
    ),
    reference: bool = typer.Option(
        False, "--reference", help="Run every step on its plain torch reference."
    ),
    weights: str = typer.Option(
        "copy",
        "--weights",
        help="copy: into huge pages at start (faster decode); map: use the file's pages (no copy).",
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors."),
    rank: int = typer.Option(None, "--rank", hidden=True),
    comm: str = typer.Option(None, "--comm", hidden=True),
    cores: str = typer.Option(None, "--cores", hidden=True),
) -> None:
    """Generate text from ARTIFACTS."""
    from xcompile import artifacts

    if top_p is not None and top_p <= 0:
        raise UserError("--top-p must be in (0, 1]; 1 keeps every token")
    if backend not in ("shm", "torch"):
        raise UserError(f"--backend {backend!r}: choose shm or torch")
    if weights not in ("copy", "map"):
        raise UserError(f"--weights {weights!r}: choose copy or map")
    manifest = artifacts.read_manifest(artifacts_dir)  # cheap checks before torch loads
    ranks = manifest.ranks

    if bind_cores is not False and comm is None and ranks == 1:
        from xcompile.runtime import launch

        launch.bind(
            launch.parse_core_list(core_list, 1)[0]
            if core_list
            else sorted(os.sched_getaffinity(0))
        )
    if comm is not None:  # a rank the supervisor started
        from xcompile.runtime import launch

        if cores:
            launch.bind(launch.parse_ranges(cores))
        from xcompile.runtime.comm import ShmComm

        communicator = ShmComm(comm, rank, ranks)
    elif backend == "torch" and "RANK" in os.environ:
        from xcompile.runtime.comm import TorchComm

        communicator = TorchComm()
    elif ranks > 1:
        if backend == "torch":
            raise UserError(
                f"--backend torch runs under torchrun: torchrun --nproc-per-node "
                f"{ranks} -m xcompile.runtime.cli {artifacts_dir} --backend torch ..."
            )
        from xcompile.runtime import launch

        groups = launch.parse_core_list(core_list, ranks) if core_list else None
        if groups is None and bind_cores is not False:
            groups = launch.split_cores(ranks)
            if groups is None and bind_cores:
                raise UserError(
                    f"--bind-cores: {ranks} ranks but only "
                    f"{len(os.sched_getaffinity(0))} allowed cores; use fewer ranks "
                    "or --no-bind-cores"
                )
        argv = [a for a in sys.argv[1:]]
        sys.exit(launch.supervise(argv, ranks, groups))
    else:
        communicator = None

    _generate(
        artifacts_dir,
        communicator,
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        as_json,
        threads,
        reference,
        weights,
    )


def _generate(
    root,
    communicator,
    prompt,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    as_json,
    threads,
    reference,
    weights="copy",
) -> None:
    import torch

    from xcompile.runtime import kernels
    from xcompile.runtime.comm import PeerLost, ShmComm
    from xcompile.runtime.model import Model
    from xcompile.runtime.tensor_parallel import Leader, follow

    n_threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n_threads)
    kernels.set_num_threads(n_threads)
    rank = communicator.rank if communicator else 0
    try:
        model = Model.load(
            root, use_kernels=not reference, rank=rank, comm=communicator, weights=weights
        )
        if rank != 0:
            follow(model, communicator)
            return
        leader = Leader(model, communicator) if communicator else model
        try:
            _lead(root, leader, prompt, max_new_tokens, temperature, top_k, top_p, seed, as_json)
        finally:
            if communicator is not None:
                leader.stop()
    except PeerLost as e:
        if isinstance(communicator, ShmComm):
            from xcompile.runtime.launch import PEER_LOST_EXIT

            sys.exit(PEER_LOST_EXIT)  # the supervisor names the rank that died, in one line
        raise UserError(str(e)) from None
    finally:
        if communicator is not None:
            communicator.close()


def _lead(root, model, prompt, max_new_tokens, temperature, top_k, top_p, seed, as_json):
    from xcompile.runtime.generate import generate
    from xcompile.runtime.sampling import Sampler, SamplingParams
    from xcompile.runtime.tokenizer import StreamDecoder, TextTokenizer

    tokenizer = TextTokenizer(root)
    defaults = _sampling_defaults(root)
    params = SamplingParams(
        temperature=temperature if temperature is not None else defaults.get("temperature", 0.0),
        top_k=top_k if top_k is not None else int(defaults.get("top_k", 0)),
        top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
        seed=seed,
    )
    prompt_ids = tokenizer.encode(prompt)
    stream = StreamDecoder(tokenizer)

    def show(token: int) -> None:
        piece = stream.push(token)
        if piece and not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    result = generate(
        model, prompt_ids, max_new_tokens, Sampler(params), tokenizer.eos_ids, on_token=show
    )
    if as_json:
        print(
            json.dumps(
                {
                    "prompt_tokens": result.prompt_tokens,
                    "tokens": result.tokens,
                    "text": tokenizer.decode(result.tokens),
                    "finish_reason": result.finish_reason,
                    "prefill_ms": round(result.prefill_ms, 3),
                    "per_token_ms": round(result.per_token_ms, 3),
                    "ranks": model.manifest.ranks,
                    **(
                        {
                            "profile_ms": {
                                k: round(v * 1e3, 3)
                                for k, v in sorted(
                                    model.plan.profile.items(), key=lambda kv: -kv[1]
                                )
                            }
                        }
                        if model.plan.profile is not None
                        else {}
                    ),
                }
            )
        )
    else:
        sys.stdout.write("\n")


def main() -> None:
    run_cli(app, "xrun")


if __name__ == "__main__":
    main()
