"""The embedding lookup read from the lm_head's quantized blocks, where the two share one table.

With tied embeddings (SmolLM2, Qwen2: no lm_head weight, the frontend multiplies by the embedding
table) a quantized lm_head leaves the table stored twice: as MatMulNBits blocks, and as floats
for the lookup (SmolLM2-135M: 56.6 MB of BF16 beside 28.3 MB of INT8 blocks). This pass runs
right after passes/quantize_nbits.py and makes the lookup dequantize the rows it needs from the
blocks; the float table then has no reader and is not stored (SmolLM2-135M `--int4`:
rank0.safetensors 172.1 MB -> 115.5 MB, the same greedy text):

    Gather(W, ids) [─► Cast(float)]  ==>  GatherBlockQuantized(Reshape(B, (-1, k_blocks * blob)),
                                              ids, scales[, zero_points]) [─► Slice(:K)]
                                          gather_axis 0, quantize_axis 1, bits, block_size
                                     or   ai.xcompile GatherNBits(B, ids, scales, zero_points)
                                          K, bits, block_size          (float32 zero points)
    rows (..., K) float32, W[n, k] = (q[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]

com.microsoft GatherBlockQuantized (ONNX Runtime 1.32, uint8 data) reads our layout as it is once
B's blocks are laid end to end per row: bits 8 or 4 (element 2j of a row in the low nibble of
byte j), scales (N, k_blocks), zero points absent (2^(bits-1)) or uint8 (INT4: two blocks a
byte, the even one low), as MatMulNBits. Its output covers the whole padded row
(k_blocks * block_size), hence the Slice where K is not a multiple of the block size. Its zero
points must have the data's type (uint8), so float32 ones (K-quant style offsets, see
quantize_nbits.py) cannot be expressed: those take our own GatherNBits, whose inputs are
MatMulNBits' own (B (N, k_blocks, blob), scales, zero_points) in GatherBlockQuantized's order.
Indices outside [-N, N) give zero rows in both (ONNX Runtime's behaviour).

A table is the same weight when the Gather (axis 0) reads the very initializer that quantize_nbits
recorded in `xcompile.nbits` (the lm_head MatMul reached it through Transpose(Cast?(W))).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from xcompile.passes.quantize_nbits import MS, nbits_names, scales_input

XC = "ai.xcompile"


class QuantizedEmbeddingPass(ir.passes.InPlacePass):
    name = "quantized_embedding"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        nbits = json.loads(model.metadata_props.get("xcompile.nbits", "{}"))
        self.rewrites = 0
        for node in list(g):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            axis = node.attributes.get("axis")
            table, ids = node.inputs
            if (axis is not None and axis.value != 0) or table is None or table.name not in nbits:
                continue
            qname, sname, zname = nbits_names(table.name)
            if not table.is_initializer() or qname not in g.initializers:
                continue
            rows, cast = node.outputs[0], None  # the float32 rows the graph reads
            if table.dtype != ir.DataType.FLOAT:
                users = list(rows.uses())
                if len(users) != 1 or not _casts_to_float(users[0][0]):
                    continue
                cast = users[0][0]
                rows = cast.outputs[0]
            if rows.is_graph_output():
                continue
            new = self._lookup(g, node, ids, qname, sname, zname, nbits[table.name])
            g.insert_before(node, new)
            out = new[-1].outputs[0]
            out.shape, out.type = rows.shape, ir.TensorType(ir.DataType.FLOAT)
            ir.convenience.replace_all_uses_with(rows, out)
            for dead in (cast, node):
                if dead is not None:
                    g.remove(dead, safe=True)
            if not table.uses():
                g.initializers.pop(table.name)
            self.rewrites += 1
        if self.rewrites:
            model.opset_imports.setdefault(MS, 1)
            if any(n.domain == XC for n in g):
                model.opset_imports.setdefault(XC, 1)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)

    @staticmethod
    def _lookup(
        g: ir.Graph, gather: ir.Node, ids: ir.Value, qname: str, sname: str, zname: str, spec
    ) -> list[ir.Node]:
        """The nodes that replace the lookup, the rows (..., K) float32 out of the last."""
        scope = gather.name.rsplit("/", 1)[0] if gather.name else "/model/embed_tokens"
        bits, block, k = int(spec["bits"]), int(spec["block_size"]), int(spec["K"])
        blocks, scales = g.initializers[qname], scales_input(g, sname)
        zero_points = scales_input(g, zname) if zname in g.initializers else None
        if zero_points is not None and zero_points.dtype == ir.DataType.FLOAT:
            return [
                ir.node(
                    "GatherNBits",
                    [blocks, ids, scales, zero_points],
                    domain=XC,
                    name=f"{scope}/GatherNBits",
                    attributes={"K": k, "bits": bits, "block_size": block},
                )
            ]
        padded = -(-k // block) * block
        # rows of B (N, k_blocks, blob) end to end: -1 rather than N, as tp.py slices the rows
        shape = ir.Value(
            name=f"{scope}/quantized_rows_shape",
            const_value=ir.tensor(np.array([-1, padded * bits // 8], dtype=np.int64)),
        )
        g.register_initializer(shape)
        reshape = ir.node("Reshape", [blocks, shape], name=f"{scope}/Reshape")
        reshape.outputs[0].name = f"{scope}/quantized_rows"
        inputs = [reshape.outputs[0], ids, scales]
        if zero_points is not None:
            inputs.append(zero_points)
        lookup = ir.node(
            "GatherBlockQuantized",
            inputs,
            domain=MS,
            name=f"{scope}/GatherBlockQuantized",
            attributes={"gather_axis": 0, "quantize_axis": 1, "bits": bits, "block_size": block},
        )
        if padded == k:
            return [reshape, lookup]
        bounds = []  # starts, ends, axes: the row's first K, without the last block's padding
        for what, value in (("starts", 0), ("ends", k), ("axes", -1)):
            bounds.append(
                ir.Value(
                    name=f"{scope}/quantized_rows_{what}",
                    const_value=ir.tensor(np.array([value], dtype=np.int64)),
                )
            )
            g.register_initializer(bounds[-1])
        cut = ir.node("Slice", [lookup.outputs[0], *bounds], name=f"{scope}/Slice")
        return [reshape, lookup, cut]


def _casts_to_float(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    return node.op_type == "Cast" and to is not None and to.value == ir.DataType.FLOAT
