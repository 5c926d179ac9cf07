"""The quantized_embedding pass: a lookup in a table that quantize_nbits turned into MatMulNBits
blocks (tied lm_head) reads the blocks. Before: Gather(W) [+ Cast]; after: GatherBlockQuantized
or GatherNBits. Both run on the same ids, with the table before being the blocks dequantized by
the reference, so the rows must agree bit for bit: under onnxruntime (GatherBlockQuantized is
its contrib op) and on our runtime's plan, kernels and references."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from xcompile.passes.quantize_nbits import nbits_names
from xcompile.passes.quantized_embedding import QuantizedEmbeddingPass
from xcompile.runtime import kernels
from xcompile.runtime.plan import build_plan

VOCAB = 40
IDS = np.array([[3, 0, 39, 7, 7, 21]])
TABLE = "model.embed_tokens.weight"


def primitive(table: np.ndarray, k: int, bits: int, block: int, quantized: dict) -> onnx.ModelProto:
    """ids -> Gather(table) [-> Cast] -> embedded, beside h -> MatMulNBits(the same table's
    blocks) -> logits, as the frontend and quantize_nbits leave a tied model."""
    nodes = [
        helper.make_node(
            "Gather", [TABLE, "input_ids"], ["rows"], "/model/embed_tokens/Gather", axis=0
        )
    ]
    if table.dtype != np.float32:  # stored BF16: the frontend casts the rows
        nodes.append(
            helper.make_node(
                "Cast", ["rows"], ["rows_f"], "/model/embed_tokens/Cast", to=TensorProto.FLOAT
            )
        )
    nodes.append(
        helper.make_node("Identity", [nodes[-1].output[0]], ["embedded"], "/model/Identity")
    )
    qname, sname, zname = nbits_names(TABLE)
    head = ["h", qname, sname] + ([zname] if zname in quantized else [])
    nodes.append(
        helper.make_node(
            "MatMulNBits",
            head,
            ["logits"],
            "/lm_head/MatMulNBits",
            domain="com.microsoft",
            K=k,
            N=VOCAB,
            bits=bits,
            block_size=block,
        )
    )
    if table.dtype == np.float32:
        init = numpy_helper.from_array(table, TABLE)
    else:  # bfloat16 bits held as uint16
        init = helper.make_tensor(
            TABLE, TensorProto.BFLOAT16, table.shape, table.tobytes(), raw=True
        )
    inits = [init] + [numpy_helper.from_array(v.numpy(), n) for n, v in quantized.items()]
    graph = helper.make_graph(
        nodes,
        "tied",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "S", k]),
        ],
        [
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, "S", k]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", VOCAB]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    spec = {"bits": bits, "block_size": block, "N": VOCAB, "K": k}
    helper.set_model_props(model, {"xcompile.nbits": json.dumps({TABLE: spec})})
    return model


def rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    m = ir.serde.deserialize_model(model)
    p = QuantizedEmbeddingPass()
    p(m)
    return ir.serde.serialize_model(m), p.rewrites


def weights(k: int, bits: int, block: int, zp: str):
    gen = torch.Generator().manual_seed(k + bits)
    w = torch.randn(VOCAB, k, generator=gen) + 0.2
    B, scales, zero_points = kernels.quantize_nbits_reference(
        w, bits, block, zp == "none", zp == "float"
    )
    qname, sname, zname = nbits_names(TABLE)
    quantized = {qname: B, sname: scales}
    if zero_points is not None:
        quantized[zname] = zero_points
    dequantized = kernels.dequantize_nbits_reference(B, scales, zero_points, bits, block, k)
    return w, quantized, dequantized


def run_plan(model: onnx.ModelProto, use_kernels: bool) -> torch.Tensor:
    """The plan's embedded rows (1, S, k), numpy feeds in, as torch."""
    plan = build_plan(model, {}, {}, use_kernels, fetch="embedded")
    k = model.graph.input[1].type.tensor_type.shape.dim[2].dim_value
    h = np.zeros((1, IDS.shape[1], k), np.float32)
    return torch.from_numpy(plan.run({"input_ids": IDS, "h": h}).copy())


@pytest.mark.parametrize("stored", ["bf16", "fp32"])
@pytest.mark.parametrize("zp", ["none", "uint8", "float"])
@pytest.mark.parametrize(
    "k,block", [(64, 64), (96, 32), (80, 32)], ids=["channel", "g32", "g32-padded"]
)
@pytest.mark.parametrize("bits", [8, 4])
def test_lookup_reads_the_blocks_and_the_float_table_goes(bits, k, block, zp, stored):
    w, quantized, dequantized = weights(k, bits, block, zp)
    table = w.numpy() if stored == "fp32" else w.to(torch.bfloat16).view(torch.uint16).numpy()
    after, rewrites = rewritten(primitive(table, k, bits, block, quantized))
    assert rewrites == 1
    ops = [n.op_type for n in after.graph.node]
    lookup = "GatherNBits" if zp == "float" else "GatherBlockQuantized"
    assert lookup in ops and "Gather" not in ops and "Cast" not in ops
    # GatherBlockQuantized gives the padded row; GatherNBits takes K
    assert ("Slice" in ops) == (k % block != 0 and lookup == "GatherBlockQuantized")
    assert TABLE not in {i.name for i in after.graph.initializer}
    # the lm_head still reads the same blocks: stored once
    assert sum(n.op_type == "MatMulNBits" for n in after.graph.node) == 1

    want = dequantized[torch.from_numpy(IDS)]
    for use_kernels in (True, False):
        assert torch.equal(run_plan(after, use_kernels), want), use_kernels
    if lookup == "GatherBlockQuantized":  # the single-rank graph still runs under onnxruntime
        sess = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"])
        h = np.zeros((1, IDS.shape[1], k), np.float32)
        (embedded,) = sess.run(["embedded"], {"input_ids": IDS, "h": h})
        assert np.array_equal(embedded, want.numpy())


def test_a_table_without_quantized_blocks_is_left_alone():
    """Untied: the lm_head has its own weight, so the embedding table is not in xcompile.nbits."""
    w, quantized, _ = weights(64, 8, 64, "none")
    model = primitive(w.numpy(), 64, 8, 64, quantized)
    meta = {p.key: p for p in model.metadata_props}
    meta["xcompile.nbits"].value = json.dumps(
        {"lm_head.weight": {"bits": 8, "block_size": 64, "N": VOCAB, "K": 64}}
    )
    after, rewrites = rewritten(model)
    assert rewrites == 0
    assert [n.op_type for n in after.graph.node].count("Gather") == 1
    assert TABLE in {i.name for i in after.graph.initializer}
