"""`xcompile shard`: single-rank artifacts -> per-rank artifacts for tensor parallelism.

    rank0.safetensors + model.onnx ──tp pass per rank──► rank{r}.onnx, rank{r}.safetensors
Each rank's file holds only its slices; tensors are read and written one at a time, so memory
stays at about one tensor whatever the model size. In place when no output is given (still
atomic: the new folder replaces the old by rename).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import onnx

from xcompile import artifacts
from xcompile.artifacts import AtomicFolder, Manifest, PlannedTensor, SafetensorsWriter
from xcompile.errors import UserError
from xcompile.frontend import families
from xcompile.passes import tp
from xcompile.quantize import _progress, locate, read_tensor, to_bytes


def family_table(family: str):
    for module in families().values():
        if module.__name__.rsplit(".", 1)[-1] == family:
            return module.TENSOR_PARALLEL
    raise UserError(f"family {family!r} has no tensor-parallel table; it cannot be sharded")


def shard(
    src: str | Path, ranks: int, out: str | Path | None = None, progress: bool | None = None
) -> Manifest:
    src = Path(src)
    manifest = artifacts.read_manifest(src)
    if ranks < 1:
        raise UserError(f"--ranks {ranks}: give a number of ranks >= 1")
    if manifest.ranks != 1:
        raise UserError(
            f"{src} is already sharded for {manifest.ranks} ranks; shard the "
            "single-rank artifacts (xcompile quantize output) instead"
        )
    if not manifest.passes:
        raise UserError(
            f"{src} holds a primitive graph (--no-fuse); tensor parallelism needs "
            "the fused graph: rebuild without --no-fuse"
        )
    tp.check_divisible(manifest.config, ranks)
    dest = Path(out) if out is not None else src
    if dest != src:
        AtomicFolder(dest).check()
    artifacts.verify(src, manifest)
    if progress is None:
        progress = sys.stderr.isatty()

    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    concat, part_rows = tp.concat_recipes(model)
    meta = {p.key: p.value for p in model.metadata_props}
    import json

    nbits = json.loads(meta.get("xcompile.nbits", "{}"))
    weights = src / "rank0.safetensors"
    header = artifacts.read_safetensors_header(weights)
    slicing = tp.slicing_table(family_table(manifest.family), list(header), concat, nbits)
    with AtomicFolder(dest) as tmp:
        files = {}
        for name in manifest.files:
            if not (name.endswith(".onnx") or name.endswith(".safetensors")):
                shutil.copyfile(src / name, tmp / name)
                files[name] = manifest.files[name]
        with open(weights, "rb") as handle:
            for rank in range(ranks):
                weight_file = f"rank{rank}.safetensors"
                graph = tp.shard_graph(model, slicing, rank, ranks, weight_file)
                used = [
                    i.name
                    for i in graph.graph.initializer
                    if i.data_location == onnx.TensorProto.EXTERNAL
                ]
                planned = [
                    PlannedTensor(n, header[n].dtype, slicing[n].shape(n, header[n].shape, ranks))
                    for n in used
                ]
                writer = SafetensorsWriter(tmp / weight_file, planned)
                locate(graph, writer.spans)
                for name in _progress(writer.order(), progress, f"rank {rank}"):
                    whole = read_tensor(weights, header[name], handle)
                    rule = slicing[name]
                    rows = part_rows.get(rule.source, [])
                    part = rule.apply(whole, rank, ranks, rows)
                    writer.write(name, to_bytes(part.contiguous()))
                    del whole, part
                writer.close()
                files[weight_file] = writer.entry()
                onnx.save(graph, tmp / f"rank{rank}.onnx")
                files[f"rank{rank}.onnx"] = artifacts.file_entry(tmp / f"rank{rank}.onnx")
        sharded = Manifest(
            family=manifest.family,
            dtype=manifest.dtype,
            ranks=ranks,
            source=manifest.source,
            passes=[*manifest.passes, "tp", "allreduce_merge"],
            files=files,
            quant=manifest.quant,
            config=manifest.config,
        )
        artifacts.write_manifest(tmp, sharded)
    return sharded
