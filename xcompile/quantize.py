"""`xcompile quantize`: checkpoint -> artifacts, streaming tensor by tensor.

    checkpoint ──(headers only)──► DecoderSpec ──► primitive graph ──► plan rank0.safetensors
         └── one tensor at a time: read, convert (fp32 / bf16), write, free ──┘

Peak memory is about one tensor in its source and its target dtype, whatever the model size: the
source is read with plain file reads (not mmap, whose touched pages would count as resident).
GPTQ and AWQ go a decoder layer at a time instead (xcompile/calibration.py): one layer's FP32
tensors plus the calibration text's hidden states.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from xcompile import artifacts
from xcompile.artifacts import (
    DTYPES,
    AtomicFolder,
    Manifest,
    PlannedTensor,
    SafetensorsWriter,
    TensorInfo,
)
from xcompile.errors import UserError
from xcompile.frontend import decoder
from xcompile.frontend.checkpoint import Checkpoint
from xcompile.frontend.graph import GraphBuilder

FLOATS = {"F32", "F16", "BF16", "F64"}
TORCH = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
WEIGHT_FILE = "rank0.safetensors"


def target_dtype(info: TensorInfo, dtype: str) -> str:
    """fp32: every float tensor F32. bf16: matrices BF16, vectors (norms, biases) stay F32."""
    if info.dtype not in FLOATS:
        return info.dtype
    if dtype == "bf16" and len(info.shape) >= 2:
        return "BF16"
    return "F32"


def build_graph(
    ckpt: Checkpoint,
    spec: decoder.DecoderSpec,
    dtype: str,
    passes: list[str] | None = None,
    scheme=None,
) -> tuple[onnx.ModelProto, list[PlannedTensor], dict[str, list[str]], list]:
    """The graph over the weights as they will be stored, and those weights (only the used ones,
    including those a pass makes by concatenating others: name -> parts). External offsets are
    placeholders until `locate` fills them from the file's plan. passes: names to run (None: all,
    []: none, the primitive graph)."""
    planned = {
        name: PlannedTensor(name, target_dtype(info, dtype), info.shape)
        for name, (_, info) in ckpt.tensors.items()
    }
    probe = {name: TensorInfo(name, t.dtype, t.shape, 0, t.nbytes) for name, t in planned.items()}
    b = GraphBuilder(probe, WEIGHT_FILE)
    try:
        decoder.build(spec, b)
    except KeyError as e:
        raise UserError(
            f"{ckpt.path}: checkpoint lacks tensor {e.args[0]!r} that a "
            f"{spec.family} model needs; is it complete?"
        ) from None
    metadata = {"family": spec.family, "dtype": dtype}
    model = b.model(f"xcompile_{spec.family}", metadata)
    reports = []
    if passes != []:
        from xcompile.passes import fuse

        model, reports = fuse(model, passes)
    if reports:
        entry = model.metadata_props.add()
        entry.key = "xcompile.pass_reports"
        entry.value = json.dumps([r.__dict__ for r in reports])
    if scheme is not None:
        import onnx_ir as ir

        from xcompile.passes.quantize_nbits import QuantizeNBitsPass
        from xcompile.passes.quantized_embedding import QuantizedEmbeddingPass

        meta = {p.key: p.value for p in model.metadata_props}
        layout_for = scheme.plan(spec, json.loads(meta.get("xcompile.concat", "{}")))
        ir_model = ir.serde.deserialize_model(model)
        QuantizeNBitsPass(layout_for, scheme.accuracy_level)(ir_model)
        QuantizedEmbeddingPass()(ir_model)  # a tied table quantized for lm_head: stored once
        model = ir.serde.serialize_model(ir_model)
    meta = {p.key: p.value for p in model.metadata_props}
    concat = json.loads(meta.get("xcompile.concat", "{}"))
    # every external initializer, as the graph declares it (source weights, concatenations,
    # quantized blocks and scales)
    stored = {code: name for name, (_, code) in DTYPES.items()}
    used = [
        PlannedTensor(i.name, stored[i.data_type], tuple(i.dims))
        for i in model.graph.initializer
        if i.data_location == onnx.TensorProto.EXTERNAL
    ]
    return model, used, concat, reports


def locate(model: onnx.ModelProto, spans: dict[str, TensorInfo]) -> None:
    for init in model.graph.initializer:
        if init.name in spans:
            for entry in init.external_data:
                if entry.key == "offset":
                    entry.value = str(spans[init.name].begin)
                elif entry.key == "length":
                    entry.value = str(spans[init.name].nbytes)


def check_graph(path: Path, fused: bool) -> None:
    """onnx.checker on the primitive graph (external data must resolve too). A fused graph
    holds ONNX Runtime's contrib ops, which the checker does not know in the default domain: for
    it, check that every external reference lies inside its file."""
    if not fused:
        onnx.checker.check_model(str(path))
        return
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in init.external_data}
            size = (path.parent / where["location"]).stat().st_size
            if int(where["offset"]) + int(where["length"]) > size:
                raise RuntimeError(f"graph initializer {init.name} points past its file")


def read_tensor(path: Path, info: TensorInfo, handle) -> torch.Tensor:
    """One tensor by a plain read of its bytes (handle: the open source file)."""
    buf = np.empty(info.nbytes, dtype=np.uint8)
    handle.seek(info.begin)
    if handle.readinto(memoryview(buf)) != info.nbytes:
        raise UserError(f"{path}: truncated while reading {info.name}; re-download it")
    return (
        torch.frombuffer(buf, dtype=TORCH[info.dtype]).view(info.shape)
        if info.nbytes
        else torch.empty(info.shape, dtype=TORCH[info.dtype])
    )


def to_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def copy_tokenizer(src: Path, dst: Path, config: dict) -> list[str]:
    copied = []
    for name in artifacts.TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "generation_config.json" not in copied:  # what transformers derives from config.json
        import json

        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        (dst / "generation_config.json").write_text(
            json.dumps({k: config[k] for k in keys if config.get(k) is not None}, indent=2)
        )
        copied.append("generation_config.json")
    return copied


def quantize(
    model_dir: str | Path | Checkpoint,
    out: str | Path,
    dtype: str,
    progress: bool | None = None,
    passes: list[str] | None = None,
    scheme=None,
) -> Manifest:
    """dtype: fp32 | bf16 | int8 | int4 (then `scheme`, a weight_only.WeightOnly, says how);
    passes: the graph passes to run (None: all of them; []: none, the primitive graph)."""
    if dtype in ("int8", "int4"):
        from xcompile.weight_only import scheme_from_flags

        # the CLI's defaults: --int4 is the measured recipe (weight_only.scheme_from_flags)
        bits = 8 if dtype == "int8" else 4
        scheme = scheme or scheme_from_flags(bits, None, None, None, None, False)
    elif dtype not in ("fp32", "bf16"):
        raise UserError(f"--{dtype}: choose --fp32, --bf16, --int8 or --int4")
    floats = "bf16" if scheme is not None else dtype  # what is not quantized is stored so
    ckpt = model_dir if isinstance(model_dir, Checkpoint) else Checkpoint.open(model_dir)
    ckpt.require_tokenizer()  # the cheap checks first: no work before a refusal
    AtomicFolder(out).check()
    spec = ckpt.family.spec(ckpt.transformers_config())
    model, used, concat, reports = build_graph(ckpt, spec, floats, passes, scheme)
    meta = {p.key: p.value for p in model.metadata_props}
    nbits = json.loads(meta.get("xcompile.nbits", "{}"))
    if progress is None:
        progress = sys.stderr.isatty()

    with AtomicFolder(out) as tmp:
        files = {}
        for name in copy_tokenizer(ckpt.path, tmp, ckpt.config):
            files[name] = artifacts.file_entry(tmp / name)
        writer = SafetensorsWriter(tmp / WEIGHT_FILE, used)
        locate(model, writer.spans)
        handles = {}
        try:
            rewritten: dict[str, torch.Tensor] = {}  # GPTQ / AWQ: floats to store instead

            def load(name: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
                if name in concat:
                    return torch.cat([load(p, as_dtype) for p in concat[name]])
                path, info = ckpt.tensors[name]
                if name in rewritten:
                    t = rewritten[name]
                else:
                    if path not in handles:
                        handles[path] = open(path, "rb")
                    t = read_tensor(path, info, handles[path])
                return t.to(as_dtype or TORCH[target_dtype(info, floats)])

            if not nbits:
                for name in _progress(writer.order(), progress, "converting"):
                    t = load(name)
                    writer.write(name, to_bytes(t))
                    del t
            else:  # a weight's blocks, scales and zero points are made together
                from xcompile.passes.quantize_nbits import nbits_names
                from xcompile.weight_only import layout_of, pack

                made_from = {part: w for w in nbits for part in nbits_names(w)}
                if scheme.algo != "rtn":  # the decoder layers' weights, calibrated layer by layer
                    write_calibrated(
                        ckpt, spec, scheme, nbits, concat, writer, load, rewritten, progress
                    )
                for name in _progress(writer.order(), progress, "quantizing"):
                    if writer.written(name):
                        continue
                    if name not in made_from:
                        writer.write_at(name, to_bytes(load(name)))
                        continue
                    w = made_from[name]
                    outputs = pack(load(w, torch.float32), layout_of(nbits[w]), scheme.search)
                    for part, t in zip(nbits_names(w), outputs):
                        if t is not None:
                            writer.write_at(part, to_bytes(t))
                    del outputs
            writer.close()
        finally:
            for h in handles.values():
                h.close()
        files[WEIGHT_FILE] = writer.entry()
        onnx.save(model, tmp / "model.onnx")
        check_graph(tmp / "model.onnx", fused=bool(reports))
        files["model.onnx"] = artifacts.file_entry(tmp / "model.onnx")
        manifest = Manifest(
            family=spec.family,
            dtype=dtype,
            ranks=1,
            source={"path": str(ckpt.path.absolute()), "config_sha256": ckpt.config_sha256},
            passes=[r.name for r in reports if r.rewrites] + (["quantize_nbits"] if nbits else []),
            files=files,
            quant=scheme.describe() if scheme is not None else None,
            config=spec.runtime_config(),
        )
        artifacts.write_manifest(tmp, manifest)
    return manifest


def write_calibrated(
    ckpt, spec, scheme, nbits: dict, concat: dict, writer, load, rewritten: dict, progress: bool
) -> None:
    """GPTQ / AWQ: each decoder layer's quantized weights (a fused weight: its parts' results
    row-concatenated, exact since groups run along rows) and the floats the algorithm rewrote
    (and whatever is concatenated from them), written as the layer finishes. `rewritten` keeps
    those floats (vectors: norms, biases) for `load`."""
    from xcompile.calibration import quantize_layers
    from xcompile.passes.quantize_nbits import nbits_names
    from xcompile.weight_only import layout_of, pack, pack_quantized

    # the weights in the scheme's main layout take the algorithm's integers; others (the plan's
    # 8-bit ones) RTN of the float weights the algorithm left (AWQ scaled their inputs' absorber)
    parts = {w: concat.get(w, [w]) for w in nbits if layout_of(nbits[w]) == scheme.layout}
    others = {w: concat.get(w, [w]) for w in nbits if w not in parts}
    floats = {
        name: concat.get(name, [name])
        for name in writer.order()
        if name not in {p for w in nbits for p in nbits_names(w)}
    }
    layers = quantize_layers(ckpt, spec, scheme)
    for _ in _progress(range(spec.layers), progress, f"{scheme.algo} layer by layer"):
        result = next(layers)
        rewritten.update(result.changed)
        for w, sources in parts.items():
            if not all(p in result.quantized for p in sources):
                continue
            q, scales, zp = zip(*(result.quantized[p] for p in sources))
            packed = pack_quantized(
                torch.cat(q), torch.cat(scales), None if zp[0] is None else torch.cat(zp), scheme
            )
            for part, t in zip(nbits_names(w), packed):
                if t is not None:
                    writer.write_at(part, to_bytes(t))
        for w, sources in others.items():
            if not all(p in result.weights for p in sources):
                continue
            weight = torch.cat([result.weights[p] for p in sources])
            packed = pack(weight, layout_of(nbits[w]), scheme.search)
            for part, t in zip(nbits_names(w), packed):
                if t is not None:
                    writer.write_at(part, to_bytes(t))
        for name, sources in floats.items():
            if any(p in result.changed for p in sources):
                writer.write_at(name, to_bytes(load(name)))
        del result
    layers.close()
    for w, sources in parts.items():  # what is left to RTN must be outside the layers (lm_head)
        if not writer.written(nbits_names(w)[0]) and any(
            p.startswith(spec.names.layer.format(i=i)) for p in sources for i in range(spec.layers)
        ):
            raise RuntimeError(f"{scheme.algo} returned no quantized {w}")


def _progress(items, enabled: bool, label: str):
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
