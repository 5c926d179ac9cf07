"""`xcompile`: compile a Hugging Face checkpoint into artifacts, and look inside them. Compiling
needs the compile extra (`pip install "xcompile[compile]"`: torch, transformers, ...); inspect
runs on the base install.

xcompile quantize MODEL [-o artifacts] (--fp32 | --bf16)
xcompile inspect ARTIFACTS [--graph]
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

from xcompile.errors import UserError, run_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compile Hugging Face checkpoints into xcompile artifacts.",
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors.")):
    pass


# what compiling imports: the compile extra's packages (`pip install xcompile` is the runtime)
COMPILE_PACKAGES = ("torch", "transformers", "onnx_ir", "onnxscript", "neural_compressor")


def _require_compile_extra(command: str) -> None:
    """One line naming what is missing and the install command, before anything imports it."""
    from importlib.util import find_spec

    missing = [name for name in COMPILE_PACKAGES if find_spec(name) is None]
    if missing:
        raise UserError(
            f"xcompile {command} needs the compile extra ({', '.join(missing)} not installed): "
            'pip install "xcompile[compile]"'
        )


def _weight_format(fp32: bool, bf16: bool, int8: bool = False, int4: bool = False) -> str:
    chosen = [
        name for name, on in (("fp32", fp32), ("bf16", bf16), ("int8", int8), ("int4", int4)) if on
    ]
    if len(chosen) != 1:
        raise UserError("choose exactly one weight format: --fp32, --bf16, --int8 or --int4")
    return chosen[0]


def _scheme(
    fmt: str, algo, group_size, sym, calib, quantize_lm_head, zero_points, search, plan, scales
):
    from xcompile.weight_only import scheme_from_flags

    bits = {"int8": 8, "int4": 4}.get(fmt)
    return scheme_from_flags(
        bits, group_size, sym, algo, calib, quantize_lm_head, zero_points, search, plan, scales
    )


ZERO_POINTS_HELP = "--asym offsets: float (default; as llama.cpp's Q4_1/Q4_K mins) or uint8."
SEARCH_HELP = "Search each block's scale for the least error (default with --int4)."
LM_HEAD_HELP = (
    "lm_head at 8 bits in blocks of 32 (the --int8 default) or, with --no-quantize-lm-head, in "
    "BF16; --int4's mixed and head8 plans always quantize it (--plan uniform: in the main layout)."
)
SCALES_HELP = (
    "Block scales (and float offsets) in float16 (default; as llama.cpp's Q8_0 / Q4_0 / Q4_1: "
    "0.5 bit a weight less each at groups of 32) or float32."
)
PLAN_HELP = (
    "mixed (--int4 default: V, down and lm_head at 8 bits, as Q4_K_M), uniform, or head8 "
    "(lm_head alone at 8 bits, as Q4_0)."
)


@app.command()
def quantize(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder."),
    out: Path = typer.Option(Path("artifacts"), "-o", "--out", help="Artifacts folder to write."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep weights in FP32."),
    bf16: bool = typer.Option(False, "--bf16", help="Store matrices in BF16."),
    int8: bool = typer.Option(False, "--int8", help="Weight-only INT8 (per channel by default)."),
    int4: bool = typer.Option(
        False, "--int4", help="Weight-only INT4 (groups of 32, float offsets, mixed plan)."
    ),
    algo: str = typer.Option(None, "--algo", help="rtn (default), gptq or awq."),
    group_size: int = typer.Option(
        None,
        "--group-size",
        help="Weights per scale: a power of two >= 16, or -1 per output channel.",
    ),
    sym: bool = typer.Option(
        None, "--sym/--asym", help="Symmetric (--int8 default) or with zero points (--int4)."
    ),
    zero_points: str = typer.Option(None, "--zero-points", help=ZERO_POINTS_HELP),
    search: bool = typer.Option(None, "--search/--no-search", help=SEARCH_HELP),
    plan: str = typer.Option(None, "--plan", help=PLAN_HELP),
    scales: str = typer.Option(None, "--scales", help=SCALES_HELP),
    calib: Path = typer.Option(
        None, "--calib", help="Calibration text for gptq/awq, one sample a line."
    ),
    quantize_lm_head: bool = typer.Option(
        None,
        "--quantize-lm-head/--no-quantize-lm-head",
        help=LM_HEAD_HELP,
    ),
    no_fuse: bool = typer.Option(False, "--no-fuse", help="Keep the primitive graph (no passes)."),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors."),
) -> None:
    """Compile MODEL into artifacts (streamed tensor by tensor), fusing the graph by default."""
    _require_compile_extra("quantize")
    chosen = [_weight_format(fp32, bf16, int8, int4)]
    scheme = _scheme(
        chosen[0],
        algo,
        group_size,
        sym,
        calib,
        quantize_lm_head,
        zero_points,
        search,
        plan,
        scales,
    )
    from xcompile.artifacts import AtomicFolder
    from xcompile.frontend.checkpoint import Checkpoint

    # config, headers, tokenizer and output first: bad input fails before torch loads
    ckpt = Checkpoint.open(model)
    ckpt.require_tokenizer()
    AtomicFolder(out).check()
    from xcompile.quantize import quantize as run

    manifest = run(ckpt, out, chosen[0], passes=[] if no_fuse else None, scheme=scheme)
    size = sum(f["size"] for f in manifest.files.values())
    typer.echo(f"wrote {out} ({manifest.family}, {manifest.dtype}, {size / 1e6:.1f} MB)")


@app.command()
def shard(
    artifacts_dir: Path = typer.Argument(
        Path("artifacts"), metavar="[ARTIFACTS]", help="Single-rank artifacts (default: artifacts)."
    ),
    ranks: int = typer.Option(..., "--ranks", min=1, help="Tensor-parallel ranks."),
    out: Path = typer.Option(None, "-o", "--out", help="Write here (default: in place)."),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors."),
) -> None:
    """Split artifacts into RANKS tensor-parallel shards (each rank's file holds only its
    slices). In place when -o is left out; atomic either way."""
    _require_compile_extra("shard")
    from xcompile.shard import shard as run

    manifest = run(artifacts_dir, ranks, out)
    dest = out or artifacts_dir
    sizes = ", ".join(
        f"rank{r} {manifest.files[f'rank{r}.safetensors']['size'] / 1e6:.1f} MB"
        for r in range(ranks)
    )
    typer.echo(f"wrote {dest} ({ranks} ranks: {sizes})")


@app.command()
def build(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifacts folder to write."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep weights in FP32."),
    bf16: bool = typer.Option(False, "--bf16", help="Store matrices in BF16."),
    int8: bool = typer.Option(False, "--int8", help="Weight-only INT8."),
    int4: bool = typer.Option(False, "--int4", help="Weight-only INT4."),
    algo: str = typer.Option(None, "--algo", help="rtn (default), gptq or awq."),
    group_size: int = typer.Option(None, "--group-size", help="Weights per scale."),
    sym: bool = typer.Option(None, "--sym/--asym", help="Symmetric or with zero points."),
    zero_points: str = typer.Option(None, "--zero-points", help=ZERO_POINTS_HELP),
    search: bool = typer.Option(None, "--search/--no-search", help=SEARCH_HELP),
    plan: str = typer.Option(None, "--plan", help=PLAN_HELP),
    scales: str = typer.Option(None, "--scales", help=SCALES_HELP),
    calib: Path = typer.Option(None, "--calib", help="Calibration text for gptq/awq."),
    quantize_lm_head: bool = typer.Option(
        None, "--quantize-lm-head/--no-quantize-lm-head", help=LM_HEAD_HELP
    ),
    ranks: int = typer.Option(1, "--ranks", min=1, help="Tensor-parallel ranks."),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors."),
) -> None:
    """quantize, then shard, in one go (the output appears only when both are done)."""
    _require_compile_extra("build")
    import tempfile

    from xcompile.artifacts import AtomicFolder

    AtomicFolder(out).check()
    chosen = _weight_format(fp32, bf16, int8, int4)
    scheme = _scheme(
        chosen, algo, group_size, sym, calib, quantize_lm_head, zero_points, search, plan, scales
    )
    from xcompile.frontend.checkpoint import Checkpoint
    from xcompile.quantize import quantize as compile_single

    ckpt = Checkpoint.open(model)
    ckpt.require_tokenizer()
    if ranks == 1:
        manifest = compile_single(ckpt, out, chosen, scheme=scheme)
        typer.echo(f"wrote {out} ({manifest.family}, {manifest.dtype})")
        return
    from xcompile.passes.tp import check_divisible
    from xcompile.shard import shard as split

    with tempfile.TemporaryDirectory(
        prefix=f".{out.name}.build-", dir=out.absolute().parent
    ) as tmp:
        single = compile_single(ckpt, Path(tmp) / "single", chosen, scheme=scheme)
        check_divisible(single.config, ranks)
        manifest = split(Path(tmp) / "single", ranks, out)
    size = sum(f["size"] for f in manifest.files.values())
    typer.echo(
        f"wrote {out} ({manifest.family}, {manifest.dtype}, {ranks} ranks, {size / 1e6:.1f} MB)"
    )


@app.command()
def inspect(
    artifacts_dir: Path = typer.Argument(..., metavar="ARTIFACTS", help="Artifacts folder."),
    graph: bool = typer.Option(False, "--graph", help="Op counts per type and the passes run."),
    verbose: bool = typer.Option(False, "--verbose", help="Tracebacks on errors."),
) -> None:
    """Print what artifacts hold: family, dtype, parameters, ranks, files, ops."""
    import onnx

    from xcompile import artifacts
    from xcompile.artifacts import parameter_count

    m = artifacts.read_manifest(artifacts_dir)
    artifacts.verify(artifacts_dir, m, checksums=False)
    weights = sorted(n for n in m.files if n.endswith(".safetensors"))
    params = sum(parameter_count(artifacts_dir / n) for n in weights) if m.ranks == 1 else None
    typer.echo(f"family      {m.family}")
    features = (m.config or {}).get("features")
    if features:
        typer.echo(f"features    {'; '.join(features)}")
    typer.echo(f"dtype       {m.dtype}" + (f"  {m.quant}" if m.quant else ""))
    if params is not None:
        typer.echo(f"parameters  {params:,}")
    typer.echo(f"ranks       {m.ranks}")
    typer.echo(f"passes      {', '.join(m.passes) or '(none: primitive graph)'}")
    typer.echo("files")
    for name, entry in sorted(m.files.items()):
        typer.echo(f"  {name:28s} {entry['size']:>14,d} B  sha256 {entry['sha256'][:12]}")
    for name in sorted(n for n in m.files if n.endswith(".onnx")):
        model = onnx.load(str(artifacts_dir / name), load_external_data=False)
        g = model.graph
        meta = {p.key: p.value for p in model.metadata_props}
        if graph and "xcompile.pass_reports" in meta:
            typer.echo(f"passes on {name} (nodes before -> after, rewrites):")
            for r in json.loads(meta["xcompile.pass_reports"]):
                typer.echo(
                    f"  {r['name']:16s} {r['nodes_before']:6d} -> {r['nodes_after']:6d}"
                    f"  ({r['rewrites']} rewrites)"
                )
        counts = Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in g.node)
        typer.echo(f"ops in {name}: {len(g.node)} nodes")
        shown = counts.most_common() if graph else counts.most_common(8)
        for op, count in shown:
            typer.echo(f"  {op:32s} {count:6d}")
        if not graph and len(counts) > 8:
            typer.echo(f"  ... {len(counts) - 8} more op types (--graph lists all)")


def main() -> None:
    run_cli(app, "xcompile")


if __name__ == "__main__":
    main()
