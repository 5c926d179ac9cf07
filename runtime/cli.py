"""`xrun`: run compiled artifacts.

    xrun ARTIFACTS (--prompt TEXT | --messages FILE.json | --chat) [--max-new-tokens N]
                   [--stop S]... [--temperature T] [--top-k K] [--top-p P]
                   [--seed S] [--beams B [--length-penalty F] [--early-stopping]]
                   [--bind-cores/--no-bind-cores] [--core-list L]
                   [--backend shm|torch] [--kv-cache auto|float32|bfloat16] [--json] [--verbose]
    xrun ARTIFACTS --perplexity FILE [--ctx 512] [--chunks N] [--json]

Text streams to stdout as it is made; --json prints one object at the end instead (one per
reply with --chat). --messages and --chat render the tokenizer's chat template (runtime/chat.py).
--beams B > 1 searches B beams (runtime/beam.py) and prints the best sequence at the end.
--perplexity scores a text file as llama.cpp's llama-perplexity does (runtime/perplexity.py).
Sharded artifacts run one process per rank (runtime/launch.py); with --backend torch each rank
is a process that torchrun started. The runtime imports none of the compile-time packages.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer

from xcompile.errors import UserError, run_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
# --kv-cache's values: kv_cache.KV_CACHE_CHOICES, spelled out here so that a bad one is refused
# before the runtime loads (tests/runtime/test_kv_cache_dtype.py holds the two equal)
KV_CACHE_CHOICES = ("auto", "float32", "bfloat16")


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


def _sampling_params(root: Path, temperature, top_k, top_p, seed):
    from xcompile.runtime.sampling import SamplingParams

    defaults = _sampling_defaults(root)
    return SamplingParams(
        temperature=temperature if temperature is not None else defaults.get("temperature", 0.0),
        top_k=top_k if top_k is not None else int(defaults.get("top_k", 0)),
        top_p=top_p if top_p is not None else defaults.get("top_p", 1.0),
        seed=seed,
    )


@dataclass
class _Inputs:
    """What to generate from: --prompt's text, --messages rendered by the chat template, or an
    interactive --chat (text None); and the --stop strings."""

    text: str | None
    template: object | None = None  # ChatTemplate, for --messages and --chat
    stop: list[str] = field(default_factory=list)
    beam: _Beam | None = None  # --beams B > 1: beam search instead of greedy/sampling

    def prompt_ids(self, tokenizer, text: str | None = None) -> list[int]:
        text = self.text if text is None else text
        return self.template.encode(tokenizer, text) if self.template else tokenizer.encode(text)


@dataclass
class _Perplexity:
    """--perplexity: the file's tokens and how they are cut (runtime/perplexity.py)."""

    tokens: list[int]
    ctx: int
    n_chunk: int
    bos: int | None  # the tokenizer adds it: each chunk's first token becomes BOS


def _perplexity_inputs(root: Path, manifest, path: Path, ctx, chunks, others) -> _Perplexity:
    """Checks that need no model (before any rank starts): no other source of prompts, a ctx
    the model holds, a readable text of at least 2 * ctx tokens."""
    from xcompile.runtime import perplexity
    from xcompile.runtime.tokenizer import TextTokenizer

    if others:
        raise UserError(
            f"--perplexity scores a file on its own; drop {'/'.join(others)} "
            "(or run them without --perplexity)"
        )
    ctx = 512 if ctx is None else ctx
    context = (manifest.config or {}).get("max_positions")
    text = perplexity.read_text(path)
    perplexity.check_ctx(ctx, int(context) if context is not None else None)
    tokens, bos = perplexity.tokenize(TextTokenizer(root), text)
    try:
        n_chunk = perplexity.chunk_count(len(tokens), ctx, chunks)
    except UserError as e:
        raise UserError(f"--perplexity {path}: {e}") from None
    return _Perplexity(tokens, ctx, n_chunk, bos)


@dataclass
class _Serve:
    """--serve: where to listen and how many requests to batch."""

    host: str
    port: int
    slots: int
    model_name: str


def _serve(root, model, options: _Serve) -> int:
    """The HTTP server on rank 0 (the others follow its forward passes) -> exit code."""
    from xcompile.runtime.engine import Engine
    from xcompile.runtime.server import Served, serve
    from xcompile.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(root)
    try:
        from xcompile.runtime.chat import ChatTemplate

        template = ChatTemplate.from_artifacts(root)
    except UserError:
        template = None  # /v1/chat/completions then says the model has no chat template
    engine = Engine(model, slots=options.slots)
    served = Served(engine, tokenizer, options.model_name, template)

    def ready(server) -> None:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        print(
            f"xrun: serving {options.model_name} on http://{host}:{port}/v1 "
            f"({options.slots} slots, {model.manifest.ranks} rank(s))",
            file=sys.stderr,
            flush=True,
        )

    try:
        code = serve(served, options.host, options.port, on_ready=ready)
    finally:
        engine.close()
    if code and model.manifest.ranks == 1:  # sharded: the supervisor names the rank that died
        print(f"xrun: the model stopped ({engine.failed}); exiting", file=sys.stderr)
    return code


def _read_inputs(root: Path, prompt, messages_file, chat: bool, stop) -> _Inputs:
    """Checks that need no model (before any rank starts): exactly one source, a readable
    messages file, a chat template when one is needed, non-empty stop strings."""
    given = [prompt is not None, messages_file is not None, chat]
    if sum(given) != 1:
        raise UserError(
            "give exactly one of --prompt TEXT, --messages FILE.json or --chat"
            + (f" (got {sum(given)})" if sum(given) else "")
        )
    stop = list(stop or [])
    if any(not s for s in stop):
        raise UserError("--stop '': a stop string must not be empty")
    if prompt is not None:
        return _Inputs(prompt, stop=stop)
    from xcompile.runtime.chat import ChatTemplate, read_messages

    messages = read_messages(messages_file) if messages_file is not None else None
    template = ChatTemplate.from_artifacts(root)
    text = template.render(messages) if messages is not None else None
    return _Inputs(text, template, stop)


@app.command()
def run(
    artifacts_dir: Path = typer.Argument(..., metavar="ARTIFACTS", help="Artifacts folder."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to continue."),
    messages_file: Path = typer.Option(
        None,
        "--messages",
        help='A JSON list of {"role", "content"} to answer, rendered by the chat template.',
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Chat on stdin: one user message per line; /exit or EOF ends."
    ),
    stop: list[str] = typer.Option(
        None, "--stop", help="Stop before this text (repeatable; not included in the output)."
    ),
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
    beams: int = typer.Option(
        1, "--beams", min=1, help="Beam search with B beams (1: greedy or sampling)."
    ),
    length_penalty: float = typer.Option(
        1.0, "--length-penalty", help="--beams: score = sum log p / length ** F."
    ),
    early_stopping: bool = typer.Option(
        False,
        "--early-stopping/--no-early-stopping",
        help="--beams: stop once B sequences have finished (default: when none can do better).",
    ),
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
    serve: bool = typer.Option(
        False, "--serve", help="Serve an OpenAI-compatible HTTP API instead of one prompt."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="--serve: the address to bind (default: this machine only)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="--serve: the TCP port."),
    slots: int = typer.Option(
        8, "--slots", min=1, help="--serve: requests decoded at once (a KV-cache slot each)."
    ),
    model_name: str = typer.Option(
        None,
        "--model-name",
        help="--serve: the model id clients ask for (default: the folder's name).",
    ),
    perplexity: Path = typer.Option(
        None,
        "--perplexity",
        help="Score this text file's perplexity (as llama.cpp's llama-perplexity scores it).",
    ),
    ctx: int = typer.Option(
        None, "--ctx", help="--perplexity: tokens per chunk, each from an empty cache (512)."
    ),
    chunks: int = typer.Option(
        None, "--chunks", min=1, help="--perplexity: score the first N chunks (default: all)."
    ),
    kv_cache: str = typer.Option(
        "auto",
        "--kv-cache",
        help="The KV cache's dtype: auto (float32 for FP32 artifacts, else bfloat16), "
        "float32 or bfloat16.",
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
    if kv_cache not in KV_CACHE_CHOICES:
        raise UserError(f"--kv-cache {kv_cache!r}: choose {', '.join(KV_CACHE_CHOICES)}")
    manifest = artifacts.read_manifest(artifacts_dir)  # cheap checks before the runtime loads
    ranks = manifest.ranks
    if weights == "copy" and (comm is not None or ranks == 1):  # a process that loads a shard:
        from xcompile.runtime import weights as resident_weights  # read it into memory from now,

        # while the tokenizer, the runtime and the plan load (_generate takes the copy)
        resident_weights.start_copy(artifacts_dir / f"rank{rank or 0}.safetensors")
    if perplexity is not None:
        given = {
            "--prompt": prompt is not None,
            "--messages": messages_file is not None,
            "--chat": chat,
            "--serve": serve,
            "--beams": beams != 1,
        }
        others = [flag for flag, on in given.items() if on]
        inputs = _perplexity_inputs(artifacts_dir, manifest, perplexity, ctx, chunks, others)
    elif ctx is not None or chunks is not None:
        raise UserError("--ctx and --chunks go with --perplexity FILE; add it or drop them")
    elif serve:
        if prompt is not None or messages_file is not None or chat:
            raise UserError("--serve takes its prompts over HTTP; drop --prompt/--messages/--chat")
        inputs = _Serve(host, port, slots, model_name or artifacts_dir.resolve().name)
    else:
        inputs = _read_inputs(artifacts_dir, prompt, messages_file, chat, stop)
    if perplexity is None:
        beam = _beam(beams, length_penalty, early_stopping, temperature, top_k, top_p, serve, chat)
        if beam is not None:
            inputs.beam = beam
    if reference:  # before any rank starts: the slim install has no torch
        from xcompile.runtime.optional import require_torch

        require_torch("--reference")

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
        # every file checked once, here: a damaged shard is one line, not one per rank (the
        # ranks then find the verified stamp)
        artifacts.verify(artifacts_dir, manifest)
        argv = [a for a in sys.argv[1:]]
        sys.exit(launch.supervise(argv, ranks, groups))
    else:
        communicator = None

    _generate(
        artifacts_dir,
        communicator,
        inputs,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        as_json,
        threads,
        reference,
        weights,
        kv_cache,
    )


def _generate(
    root,
    communicator,
    inputs,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    as_json,
    threads,
    reference,
    weights="copy",
    kv_cache="auto",
) -> None:
    from xcompile.runtime import weights as resident_weights

    rank = communicator.rank if communicator else 0
    shard = Path(root) / f"rank{rank}.safetensors"
    if weights == "copy":  # read the shard while the runtime loads (begun in run(), if not here)
        resident_weights.start_copy(shard)
    from xcompile.runtime import kernels, launch
    from xcompile.runtime.comm import PeerLost, ShmComm
    from xcompile.runtime.model import Model
    from xcompile.runtime.tensor_parallel import Leader, follow

    n_threads = threads or launch.cores()
    if "torch" in sys.modules:  # --reference's ops, --backend torch's collectives: same cores
        sys.modules["torch"].set_num_threads(n_threads)
    kernels.set_num_threads(n_threads)
    try:
        model = Model.load(
            root,
            use_kernels=not reference,
            rank=rank,
            comm=communicator,
            weights=weights,
            kv_cache=kv_cache,
        )
        if rank != 0:
            follow(model, communicator)
            return
        leader = Leader(model, communicator) if communicator else model
        try:
            if isinstance(inputs, _Serve):
                code = _serve(root, leader, inputs)
                if code:
                    sys.exit(code)
            elif isinstance(inputs, _Perplexity):
                _perplexity(leader, inputs, as_json)
            else:
                _lead(
                    root, leader, inputs, max_new_tokens, temperature, top_k, top_p, seed, as_json
                )
        finally:
            if communicator is not None:
                leader.stop()
    except PeerLost as e:
        if isinstance(communicator, ShmComm):
            from xcompile.runtime.launch import PEER_LOST_EXIT

            sys.exit(PEER_LOST_EXIT)  # the supervisor names the rank that died, in one line
        raise UserError(str(e)) from None
    finally:
        resident_weights.cancel_copy(shard)  # a load that failed leaves it behind
        if communicator is not None:
            communicator.close()


def _perplexity(model, inputs: _Perplexity, as_json: bool) -> None:
    """--perplexity on rank 0 (the others follow its forward passes): each chunk prefilled in one
    forward into one cache, overwritten from position 0 (an empty cache for every chunk)."""
    import time

    from xcompile import _C
    from xcompile.runtime.arrays import dtype_name
    from xcompile.runtime.kv_cache import Segment
    from xcompile.runtime.perplexity import evaluate

    ctx = inputs.ctx
    cache = model.new_cache(ctx)

    def logits_of(ids: list[int], first: int):
        """ids (ctx,) -> logits (ctx - 1 - first, vocab) at positions first .. ctx - 2."""
        if model.batchable:  # only the scored rows go through the output projection
            return model.forward_batch(
                [Segment(0, 0, len(ids))], ids, cache, list(range(first, len(ids) - 1))
            )
        return model.forward(ids, 0, cache)[first:-1]  # the primitive graph: every row

    figures: list[str] = []  # llama.cpp's running estimate after each chunk: [1]17.1234,
    bar = _PerplexityBar(inputs.n_chunk) if sys.stderr.isatty() else None

    def on_chunk(i, score) -> None:
        figures.append(f"[{i + 1}]{score.ppl:.4f},")
        if bar is not None:
            bar.advance(score.ppl)
        elif not as_json:
            sys.stdout.write(figures[-1])
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        score = evaluate(inputs.tokens, ctx, inputs.n_chunk, inputs.bos, logits_of, on_chunk)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if as_json:
        report = {
            "ppl": score.ppl,
            "ppl_stderr": score.ppl_stderr,
            "tokens": score.count,  # scored tokens: chunks * (ctx - 1 - ctx // 2)
            "chunks": inputs.n_chunk,
            "ctx": ctx,
            "seconds": round(seconds, 3),  # the chunks' forwards and scoring, not loading
            "ranks": model.manifest.ranks,
            "isa": _C.isa(),
            "kv_cache": dtype_name(model.kv_dtype),
        }
        print(json.dumps(report))
        return
    if bar is not None:
        sys.stdout.write("".join(figures))
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {score.ppl:.4f} +/- {score.ppl_stderr:.5f}")


class _PerplexityBar:
    """rich's progress bar on stderr (a terminal only), with the running estimate."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("perplexity", total=total)

    def advance(self, ppl: float) -> None:
        self.progress.update(self.task, advance=1, description=f"perplexity {ppl:.4f}")

    def close(self) -> None:
        self.progress.stop()


@dataclass(frozen=True)
class _Beam:
    """--beams B > 1 and how hypotheses are scored and when the search stops."""

    beams: int
    length_penalty: float
    early_stopping: bool


def _beam(beams, length_penalty, early_stopping, temperature, top_k, top_p, serve, chat):
    """--beams' options checked before any rank starts -> _Beam, or None for one beam."""
    if beams == 1:
        return None
    if serve or chat:
        raise UserError(f"--beams {beams} runs with --prompt or --messages; drop --serve/--chat")
    if (temperature or 0) > 0 or top_k or (top_p is not None and top_p < 1):
        raise UserError(
            f"--beams {beams} searches deterministically (beam sampling is not supported); "
            "drop --temperature/--top-k/--top-p"
        )
    return _Beam(beams, length_penalty, early_stopping)


def _beam_lead(model, tokenizer, inputs, max_new_tokens, as_json) -> None:
    """--beams: search, then print the best sequence's text (cut at the first --stop string)."""
    from xcompile.runtime.beam import beam_search
    from xcompile.runtime.stopping import StopChecker

    opts = inputs.beam
    result = beam_search(
        model,
        inputs.prompt_ids(tokenizer),
        opts.beams,
        max_new_tokens,
        tokenizer.eos_ids,
        opts.length_penalty,
        opts.early_stopping,
    )
    # the text as the greedy path makes it: EOS not shown, cut before a stop string (the tokens
    # after the one that completed it dropped)
    stop = StopChecker(tokenizer, inputs.stop, tokenizer.eos_ids)
    for i, token in enumerate(result.tokens):
        if stop.push(token)[1] is not None:
            result.tokens, result.finish_reason = result.tokens[: i + 1], "stop"
            break
    stop.flush()
    result.text = stop.text
    if as_json:
        report = _report(model, result)
        print(json.dumps({**report, "beams": opts.beams, "score": round(result.score, 6)}))
    else:
        sys.stdout.write(result.text + "\n")


def _lead(root, model, inputs, max_new_tokens, temperature, top_k, top_p, seed, as_json):
    from xcompile.runtime.sampling import Sampler
    from xcompile.runtime.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(root)
    if inputs.beam is not None:
        _beam_lead(model, tokenizer, inputs, max_new_tokens, as_json)
        return
    sampler = Sampler(_sampling_params(root, temperature, top_k, top_p, seed))
    if inputs.text is None:
        _chat(model, tokenizer, sampler, inputs, max_new_tokens, as_json)
        return
    result = _complete(
        model, tokenizer, inputs.prompt_ids(tokenizer), sampler, max_new_tokens, inputs, as_json
    )
    if as_json:
        print(json.dumps(_report(model, result)))
    else:
        sys.stdout.write("\n")


def _complete(model, tokenizer, prompt_ids, sampler, max_new_tokens, inputs, as_json):
    """One generation, its text streamed to stdout unless as_json; stops at EOS, a --stop
    string (its text not included) or max_new_tokens."""
    from xcompile.runtime.generate import generate
    from xcompile.runtime.stopping import StopChecker

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stop = StopChecker(tokenizer, inputs.stop, tokenizer.eos_ids)
    return generate(
        model,
        prompt_ids,
        max_new_tokens,
        sampler,
        tokenizer.eos_ids,
        stop=stop,
        on_text=None if as_json else show,
    )


def _report(model, result) -> dict:
    """--json's object (DESIGN.md, CLI contract)."""
    from xcompile import _C
    from xcompile.runtime.arrays import dtype_name

    profile = model.plan.profile
    return {
        "prompt_tokens": result.prompt_tokens,
        "tokens": result.tokens,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prefill_ms": round(result.prefill_ms, 3),
        "per_token_ms": round(result.per_token_ms, 3),
        "ranks": model.manifest.ranks,
        "isa": _C.isa(),  # the kernels' path on this CPU (XCOMPILE_ISA forces one)
        "kv_cache": dtype_name(model.kv_dtype),  # float32 | bfloat16
        **(
            {
                "profile_ms": {
                    k: round(v * 1e3, 3) for k, v in sorted(profile.items(), key=lambda kv: -kv[1])
                }
            }
            if profile is not None
            else {}
        ),
    }


def _chat(model, tokenizer, sampler, inputs, max_new_tokens, as_json) -> None:
    """--chat: read a user line, answer it with the whole conversation as the prompt (a new
    KV cache per turn), keep both in the history. /reset forgets it; /exit or EOF ends."""
    from xcompile.runtime.generate import check_prompt

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing for input())

        print("chat: one message per line; /reset starts over, /exit quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # EOF
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = inputs.prompt_ids(tokenizer, inputs.template.render(history))
            check_prompt(model, ids)
        except UserError as e:  # too long for the context, or refused: say so, keep chatting
            history.pop()
            print(f"xrun: error: {e} (or /reset)", file=sys.stderr)
            continue
        result = _complete(model, tokenizer, ids, sampler, max_new_tokens, inputs, as_json)
        history.append({"role": "assistant", "content": result.text})
        if as_json:
            print(json.dumps(_report(model, result)), flush=True)
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()


def main() -> None:
    run_cli(app, "xrun")


if __name__ == "__main__":
    main()
