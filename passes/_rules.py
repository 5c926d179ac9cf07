"""What the passes share: a pass made of onnxscript rewrite rules, and constant lookups."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class RulePass(ir.passes.InPlacePass):
    """An in-place pass that applies a set of onnxscript rewrite rules until none matches."""

    name = "rules"

    def rules(self, model: ir.Model) -> list[pattern.RewriteRule]:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = pattern.RewriteRuleSet(self.rules(model)).apply_to_model(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant (an initializer with data, or a Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        try:
            return value.const_value.numpy()
        except Exception:  # an external tensor whose file is not written yet
            return None
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def scalar(value: ir.Value | None) -> float | int | None:
    array = constant(value)
    if array is None or array.size != 1:
        return None
    return array.reshape(()).item()
