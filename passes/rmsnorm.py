"""RMSNorm -> SimplifiedLayerNormalization (onnxscript's own rule, which matches our op order).

x ─► Pow(2) ─► ReduceMean(-1) ─► Add(eps) ─► Sqrt ─► Reciprocal ─┐
└──────────────────────────────────────────────────────────► Mul ─► Mul(weight)
    ==>  SimplifiedLayerNormalization(x, weight, axis=-1, epsilon)
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

ORDER = 10


class RMSNormPass(ir.passes.InPlacePass):
    name = "rmsnorm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = fuse_rms_normalization(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)


PASS = RMSNormPass
