"""Residual add + norm -> one op (onnxscript's own rules).

a ─► Add ◄─ b          (the residual stream)
      ├─► SimplifiedLayerNormalization(w)   ==>  SkipSimplifiedLayerNormalization(a, b, w)
      └─► (the sum, used by the next residual)      outputs: normed, -, -, sum
and the same with LayerNormalization (GPT-J) ==> SkipLayerNormalization(a, b, gamma, beta)
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)

ORDER = 20


class SkipNormPass(ir.passes.InPlacePass):
    name = "skip_norm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = fuse_skip_rms_normalization(model) + fuse_skip_layer_normalization(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)


PASS = SkipNormPass
