"""RMSNorm -> SimplifiedLayerNormalization (onnxscript's own rule, which matches our op order).

x ─► Pow(2) ─► ReduceMean(-1) ─► Add(eps) ─► Sqrt ─► Reciprocal ─┐
└──────────────────────────────────────────────────────────► Mul ─► Mul(weight)
    ==>  SimplifiedLayerNormalization(x, weight, axis=-1, epsilon)

onnxscript's rule also takes a Cast of x into the pattern (x cast to the compute type), and it
tries that first. When the Cast's output has other readers the match then fails as a whole:
the first layer's norm reads the embedding cast from BF16 to FP32, which the residual Add reads
too. A second pass of the same rule with x taken as it is fuses those (the Cast stays).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import (
    RmsNormFusion,
    fuse_rms_normalization,
)

ORDER = 10


class _UncastInput(RmsNormFusion):
    """onnxscript's RmsNormFusion without the optional Cast of x (no compute_dtype: the norm
    runs in x's own type)."""

    def pattern(self, op, x, scale, epsilon, compute_dtype, target_dtype):
        mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, noop_with_empty_axes=0)
        reciprocal_rms = op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon)))
        normalized = op.Mul(x, reciprocal_rms)
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
        scale = pattern.OrValue([op.Cast(scale, to=compute_dtype), scale])
        if self._mul_order:
            return op.Mul(normalized, scale)
        return op.Mul(scale, normalized)


_fuse_uncast = _fusion_utils.apply_fusion_rules(
    pattern.RewriteRuleSet(
        [
            _UncastInput.rule("RmsNormUncastInput1", _mul_order=False),
            _UncastInput.rule("RmsNormUncastInput2", _mul_order=True),
        ]
    )
)


class RMSNormPass(ir.passes.InPlacePass):
    name = "rmsnorm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = fuse_rms_normalization(model)
        self.rewrites += _fuse_uncast(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)


PASS = RMSNormPass
