"""Parallel-residual blocks (GPT-J): one AllReduce per layer instead of two.

Attention and MLP read the same normed input and their outputs are added, so their partial sums
can be added before reducing (the reduction is linear):

    Add(AllReduce(a), AllReduce(b))                 ==>  AllReduce(Add(a, b))
    Add(AllReduce(a), Add(AllReduce(b), bias))      ==>  Add(AllReduce(Add(a, b)), bias)
The bias (fc_out's) is still added once, after the reduction, never once per rank.
"""

from __future__ import annotations

import onnx_ir as ir

ORDER = 0  # not a fusion: run by `xcompile shard` after the tp pass, not by passes.fuse


def _reduced(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    if node is not None and node.op_type == "AllReduce" and len(value.uses()) == 1:
        return node
    return None


def _biased(value: ir.Value) -> tuple[ir.Node, ir.Node, ir.Value] | None:
    """value = Add(AllReduce(x), bias) with a constant bias -> (add, allreduce, bias)"""
    add = value.producer()
    if add is None or add.op_type != "Add" or len(value.uses()) != 1:
        return None
    for i in (0, 1):
        ar = _reduced(add.inputs[i])
        bias = add.inputs[1 - i]
        if ar is not None and bias.is_initializer():
            return add, ar, bias
    return None


class AllReduceMergePass(ir.passes.InPlacePass):
    name = "allreduce_merge"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.rewrites = 0
        for node in list(graph):
            if node.op_type != "Add" or node.graph is None:
                continue
            a, b = node.inputs
            first = _reduced(a)
            for other in (b,):
                second, biased = _reduced(other), None
                if second is None:
                    biased = _biased(other)
                if first is None or (second is None and biased is None):
                    continue
                partial_b = (second or biased[1]).inputs[0]
                scope = node.name.rsplit("/", 1)[0]
                summed = ir.node("Add", [first.inputs[0], partial_b], name=f"{scope}/partials")
                reduce = ir.node(
                    "AllReduce", [summed.outputs[0]], domain=first.domain, name=f"{scope}/AllReduce"
                )
                new = [summed, reduce]
                result = reduce.outputs[0]
                if biased is not None:
                    add_bias = ir.node("Add", [result, biased[2]], name=f"{scope}/bias")
                    new.append(add_bias)
                    result = add_bias.outputs[0]
                graph.insert_before(node, new)
                result.shape, result.type = node.outputs[0].shape, node.outputs[0].type
                ir.convenience.replace_all_uses_with(node.outputs[0], result)
                dead = (
                    [node, first, second]
                    if second is not None
                    else [node, first, biased[0], biased[1]]
                )
                graph.remove(dead, safe=True)
                self.rewrites += 1
        return ir.passes.PassResult(model, modified=self.rewrites > 0)
