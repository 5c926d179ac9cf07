"""A small ONNX graph builder: namespaced node names, external weight references, value infos.

Node names follow onnxruntime-genai's model builder (`/model/layers.3/attn/q_proj/MatMul`), so a
graph opened in Netron reads like the model. A node's output is named after the node
(`/model/layers.3/attn/q_proj/MatMul/output_0`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xcompile.artifacts import DTYPES, TensorInfo

OPSET = 18

# what the compute side of the graph runs in; weights stored in another dtype get a Cast
COMPUTE = TensorProto.FLOAT


class GraphBuilder:
    def __init__(self, weights: dict[str, TensorInfo], weight_file: str):
        """weights: name -> where its bytes lie in `weight_file` (relative to the graph file)."""
        self.weights = weights
        self.weight_file = weight_file
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._weight_values: dict[str, str] = {}
        self.metadata: dict[str, str] = {}  # facts passes need (model metadata_props)

    # -- nodes ----------------------------------------------------------------------------------

    def op(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[str],
        n_out: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> str | list[str]:
        """Emit one node named `{name}/{op_type}`; returns its output name(s)."""
        node_name = f"{name}/{op_type}"
        base, i = node_name, 1
        while node_name in self._names:
            i += 1
            node_name = f"{base}_{i}"
        self._names.add(node_name)
        outputs = [f"{node_name}/output_{k}" for k in range(n_out)]
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), outputs, name=node_name, domain=domain or None, **attrs
            )
        )
        return outputs[0] if n_out == 1 else outputs

    def const(self, name: str, value: Any, dtype: Any = np.int64) -> str:
        """A small inline constant (shapes, axes, scalars, inv_freq), named `name`."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    # -- weights ---------------------------------------------------------------------------------

    def weight(self, name: str) -> str:
        """The weight `name` as a value of the compute dtype (an external initializer, cast if it
        is stored in another float dtype). The same weight used twice is referenced once."""
        if name in self._weight_values:
            return self._weight_values[name]
        t = self.initializer(name)
        value = name
        if t.data_type != COMPUTE:
            value = self.op("Cast", "/" + name.replace(".", "/"), [name], to=COMPUTE)
        self._weight_values[name] = value
        return value

    def initializer(self, name: str) -> onnx.TensorProto:
        """Register weight `name` as an external initializer, as stored (no cast)."""
        if name in self.initializers:
            return self.initializers[name]
        info = self.weights[name]
        t = TensorProto()
        t.name = name
        t.data_type = DTYPES[info.dtype][1]
        t.dims.extend(info.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.weight_file),
            ("offset", str(info.begin)),
            ("length", str(info.nbytes)),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.initializers[name] = t
        return t

    def has_weight(self, name: str) -> bool:
        return name in self.weights

    # -- graph inputs / outputs -------------------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Expose `value` as graph output `name` (an Identity renames it)."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"/output/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def model(self, graph_name: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            self.inputs,
            self.outputs,
            initializer=list(self.initializers.values()),
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="xcompile"
        )
        model.ir_version = 8
        for key, value in {**self.metadata, **metadata}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        return model
