"""Projections that read the same input -> one MatMul on their concatenated weights.

    h ─► MatMul(Wq ᵀ) ─► q        h ─► MatMul([Wq; Wk; Wv]ᵀ) ─► Split(nq, nk, nv) ─► q, k, v
    h ─► MatMul(Wk ᵀ) ─► k   ==>
    h ─► MatMul(Wv ᵀ) ─► v
This is the QKV fusion and the gate/up fusion (and, in GPT-J, where attention and MLP read the
same LayerNorm output, Q/K/V/fc_in in one). Decode then reads one weight matrix per group in one
kernel call. W (N, K) is each checkpoint's nn.Linear weight; the graph uses Transpose(Cast?(W)).

The concatenated weight does not exist in the checkpoint: it is an external initializer named
after its parts, and model metadata `xcompile.concat` ({name: [parts]}) tells the quantize
driver to write it by concatenating the parts' rows, one group at a time
(`xcompile.concat_rows`, {name: [rows of each part]}, tells the tp pass where parts begin).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx_ir as ir

ORDER = 50


def weight_chain(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """B operand of a MatMul -> (weight initializer (N, K), [Transpose, Cast?]) or None."""
    node = value.producer()
    if node is None or node.op_type != "Transpose" or list(node.attributes["perm"].value) != [1, 0]:
        return None
    chain, src = [node], node.inputs[0]
    cast = src.producer()
    if cast is not None and cast.op_type == "Cast":
        chain.append(cast)
        src = cast.inputs[0]
    if not src.is_initializer() or src.producer() is not None or len(src.shape or ()) != 2:
        return None
    return src, chain


def fused_name(names: list[str]) -> str:
    stems = [n.removesuffix(".weight") for n in names]
    prefix = os.path.commonprefix(stems)
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix + "+".join(s[len(prefix) :] for s in stems) + ".weight"


class ConcatMatMulPass(ir.passes.InPlacePass):
    name = "concat_matmul"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        recipes = json.loads(model.metadata_props.get("xcompile.concat", "{}"))
        part_rows = json.loads(model.metadata_props.get("xcompile.concat_rows", "{}"))
        self.rewrites = 0
        groups: dict[ir.Value, list[tuple[ir.Node, ir.Value, list[ir.Node]]]] = {}
        for node in graph:
            if node.op_type == "MatMul" and node.domain == "":
                found = weight_chain(node.inputs[1])
                if found is not None:
                    groups.setdefault(node.inputs[0], []).append((node, *found))
        for x, members in groups.items():
            if len(members) < 2:
                continue
            weights = [w for _, w, _ in members]
            casts = [len(chain) for _, _, chain in members]
            if (
                len({w.dtype for w in weights}) != 1
                or len(set(casts)) != 1
                or len({w.shape[1] for w in weights}) != 1
            ):
                continue
            sizes = [int(w.shape[0]) for w in weights]
            name = fused_name([w.name for w in weights])
            tensor = ir.ExternalTensor(
                location="rank0.safetensors",
                offset=0,
                length=int(sum(sizes) * int(weights[0].shape[1]) * weights[0].dtype.itemsize),
                dtype=weights[0].dtype,
                shape=ir.Shape([sum(sizes), weights[0].shape[1]]),
                name=name,
                base_dir="",
            )
            merged = ir.Value(
                name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor
            )
            graph.register_initializer(merged)
            recipes[name] = [w.name for w in weights]
            part_rows[name] = sizes

            first = members[0][0]
            scope = first.name.rsplit("/", 2)[0] if first.name else "/fused"
            b = merged
            new_nodes = []
            if casts[0] == 2:  # stored in another dtype than the compute one
                to = members[0][2][1].attributes["to"]
                cast = ir.node("Cast", [b], attributes={"to": to.value}, name=f"{scope}/Cast")
                new_nodes.append(cast)
                b = cast.outputs[0]
            transpose = ir.node(
                "Transpose", [b], attributes={"perm": [1, 0]}, name=f"{scope}/fused_proj/Transpose"
            )
            matmul = ir.node("MatMul", [x, transpose.outputs[0]], name=f"{scope}/fused_proj/MatMul")
            split_sizes = ir.Value(
                name=f"{scope}/fused_proj/split_sizes",
                const_value=ir.tensor(np.array(sizes, dtype=np.int64)),
            )
            graph.register_initializer(split_sizes)
            split = ir.node(
                "Split",
                [matmul.outputs[0], split_sizes],
                attributes={"axis": -1},
                num_outputs=len(members),
                name=f"{scope}/fused_proj/Split",
            )
            new_nodes += [transpose, matmul, split]
            graph.insert_before(first, new_nodes)
            for (node, _, _), out in zip(members, split.outputs):
                out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
                ir.convenience.replace_all_uses_with(node.outputs[0], out)
            for node, _, chain in members:
                graph.remove([node, *chain], safe=True)
            self.rewrites += 1
        for name in [n for n, v in graph.initializers.items() if not v.uses()]:
            if name in {w for parts in recipes.values() for w in parts} or name in recipes:
                graph.initializers.pop(name)
        if recipes:
            model.metadata_props["xcompile.concat"] = json.dumps(recipes)
            model.metadata_props["xcompile.concat_rows"] = json.dumps(part_rows)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)


PASS = ConcatMatMulPass
