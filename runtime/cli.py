"""`xrun`: run compiled artifacts.

    xrun ARTIFACTS --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                   [--seed S] [--json] [--verbose]

Text streams to stdout as it is made; --json prints one object at the end instead. The runtime
imports none of the compile-time packages (transformers, neural_compressor, onnxscript, onnx_ir).
"""

from __future__ import annotations

import json
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
    return {k: g[k] for k in ("temperature", "top_k", "top_p") if isinstance(g.get(k), (int, float))}


@app.command()
def run(
    artifacts_dir: Path = typer.Argument(..., metavar="ARTIFACTS", help="Artifacts folder."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1,
                                       help="Tokens to generate at most."),
    temperature: float = typer.Option(None, "--temperature", min=0.0,
                                      help="0 is greedy (default unless generation_config "
                                           "samples)."),
    top_k: int = typer.Option(None, "--top-k", min=0, help="Sample among the K likeliest (0: all)."),
    top_p: float = typer.Option(None, "--top-p", min=0.0, max=1.0,
                                help="Sample within probability mass P."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    threads: int = typer.Option(None, "--threads", min=1, help="Threads (default: all cores)."),
    reference: bool = typer.Option(False, "--reference",
                                   help="Run every step on its plain torch reference."),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors."),
) -> None:
    """Generate text from ARTIFACTS."""
    from xcompile import artifacts

    if top_p is not None and top_p <= 0:
        raise UserError("--top-p must be in (0, 1]; 1 keeps every token")
    artifacts.read_manifest(artifacts_dir)  # fails fast, before torch loads; Model.load verifies

    from xcompile.runtime.generate import generate
    from xcompile.runtime.model import Model
    from xcompile.runtime.sampling import Sampler, SamplingParams
    from xcompile.runtime.tokenizer import StreamDecoder, TextTokenizer

    if threads:
        import torch

        from xcompile.runtime import kernels

        torch.set_num_threads(threads)
        kernels.set_num_threads(threads)
    model = Model.load(artifacts_dir, use_kernels=not reference)
    tokenizer = TextTokenizer(artifacts_dir)
    defaults = _sampling_defaults(artifacts_dir)
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

    result = generate(model, prompt_ids, max_new_tokens, Sampler(params), tokenizer.eos_ids,
                      on_token=show)
    if as_json:
        print(json.dumps({
            "prompt_tokens": result.prompt_tokens,
            "tokens": result.tokens,
            "text": tokenizer.decode(result.tokens),
            "finish_reason": result.finish_reason,
            "prefill_ms": round(result.prefill_ms, 3),
            "per_token_ms": round(result.per_token_ms, 3),
            "ranks": model.manifest.ranks,
        }))
    else:
        sys.stdout.write("\n")


def main() -> None:
    run_cli(app, "xrun")


if __name__ == "__main__":
    main()
