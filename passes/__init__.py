"""Graph passes over the ONNX IR (onnx-ir), one file each, found by their place.

A pass module defines `ORDER` (when it runs: fusions that others build on come first) and
`PASS`, an onnx-ir pass with a `name`. `fuse()` runs them in order under onnx-ir's PassManager
and reports, per pass, the nodes before and after. Adding a pass is adding a file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import onnx


@dataclass
class PassReport:
    name: str
    nodes_before: int
    nodes_after: int
    rewrites: int


def names() -> list[str]:
    """Every pass, in the order `fuse` runs them."""
    return [p.name for p in discover()]


def discover() -> list:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "PASS"):
            found.append((module.ORDER, module.PASS))
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def fuse(
    model: onnx.ModelProto, only: list[str] | None = None
) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run every pass (or those named in `only`) in order; returns the fused model and what
    each pass changed."""
    import onnx_ir as ir
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

    ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
    reports = []
    for factory in discover():
        p = factory()
        if only is not None and p.name not in only:
            continue
        before = sum(1 for _ in ir_model.graph)
        manager = ir.passes.PassManager([p, RemoveUnusedNodesPass()])
        manager(ir_model)
        reports.append(
            PassReport(p.name, before, sum(1 for _ in ir_model.graph), getattr(p, "rewrites", 0))
        )
    if any(r.rewrites for r in reports):
        # the per-layer copies of shared subgraphs a rewrite made (sequence lengths) become one
        ir.passes.PassManager([CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass()])(
            ir_model
        )
        readable_names(ir_model.graph)
    return ir.serde.serialize_model(ir_model), reports


def readable_names(graph) -> None:
    """Name the nodes the rewriter made (`node_X_3`) after where they sit in the model, as the
    frontend names its own (`/model/layers.3/attn/.../GroupQueryAttention`)."""
    taken = {n.name for n in graph}
    for node in graph:
        if node.name and node.name.startswith("/"):
            continue
        places = [
            v.name.rsplit("/", 2)[0] for v in node.outputs if v.name and v.name.startswith("/")
        ]
        places += [
            u.name.rsplit("/", 1)[0]
            for v in node.outputs
            for u, _ in v.uses()
            if u.name and u.name.startswith("/")
        ]
        places += [
            v.producer().name.rsplit("/", 1)[0]
            for v in node.inputs
            if v is not None
            and v.producer() is not None
            and v.producer().name
            and v.producer().name.startswith("/")
        ]
        base = f"{places[0] if places else '/fused'}/{node.op_type}"
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        node.name = name
        taken.add(name)
