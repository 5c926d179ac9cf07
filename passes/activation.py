"""Activations -> one op each.

    g ─► Sigmoid ─► Mul(g, ·) ─► Mul(·, up)          ==>  ai.xcompile.SiluMul(g, up)
    FastGelu(g) ─► Mul(·, up)                         ==>  ai.xcompile.GeluMul(g, up)  (GeGLU)
    0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x³)))   ==>  com.microsoft.FastGelu(x)
    0.5 x (1 + Erf(x / sqrt 2))                      ==>  com.microsoft.Gelu(x)

ONNX Runtime has no SiLU·mul or GELU·mul op, so SiluMul and GeluMul live in domain ai.xcompile
with model-local function bodies (Sigmoid, Mul, Mul; the tanh GELU's primitives, Mul):
onnxruntime inlines them, xrun binds them to their csrc kernels.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from xcompile.passes._rules import RulePass, scalar

ORDER = 60
DOMAIN = "ai.xcompile"


def _close(value, expected: float) -> bool:
    got = scalar(value)
    return got is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))


class SiluMulRule(pattern.RewriteRuleClassBase):
    def pattern(self, op, g, up):
        return op.Mul(op.Mul(g, op.Sigmoid(g)), up)

    def rewrite(self, op, g, up):
        return op.SiluMul(g, up, _domain=DOMAIN)


class GeluMulRule(pattern.RewriteRuleClassBase):
    def pattern(self, op, g, up):
        return op.Mul(op.FastGelu(g, _domain="com.microsoft"), up)

    def rewrite(self, op, g, up):
        return op.GeluMul(g, up, _domain=DOMAIN)


class FastGeluRule(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, half, c, k, one):
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Tanh(op.Mul(op.Add(x, op.Mul(cube, c)), k))
        return op.Mul(op.Mul(x, half), op.Add(inner, one))

    def check(self, context, half, c, k, one, **_):
        ok = (
            _close(half, 0.5)
            and _close(c, 0.044715)
            and _close(k, math.sqrt(2 / math.pi))
            and _close(one, 1.0)
        )
        return pattern.MatchResult() if ok else pattern.MatchResult().fail("not gelu_tanh")

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


class GeluRule(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, half, k, one):
        return op.Mul(op.Mul(x, half), op.Add(op.Erf(op.Mul(x, k)), one))

    def check(self, context, half, k, one, **_):
        ok = _close(half, 0.5) and _close(k, 2**-0.5) and _close(one, 1.0)
        return pattern.MatchResult() if ok else pattern.MatchResult().fail("not erf gelu")

    def rewrite(self, op, x, **_):
        return op.Gelu(x, _domain="com.microsoft")


def gelu_mul_function() -> ir.Function:
    """The body ORT runs for ai.xcompile.GeluMul: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
    * up, in standard ops."""
    g, up = ir.Value(name="g"), ir.Value(name="up")

    def const(v: float) -> ir.Node:
        return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(v, np.float32))})

    half, c, k, one = const(0.5), const(0.044715), const(math.sqrt(2 / math.pi)), const(1.0)
    sq = ir.node("Mul", [g, g])
    cube = ir.node("Mul", [sq.outputs[0], g])
    cc = ir.node("Mul", [cube.outputs[0], c.outputs[0]])
    inner = ir.node("Add", [g, cc.outputs[0]])
    scaled = ir.node("Mul", [inner.outputs[0], k.outputs[0]])
    tanh = ir.node("Tanh", [scaled.outputs[0]])
    plus = ir.node("Add", [tanh.outputs[0], one.outputs[0]])
    hx = ir.node("Mul", [g, half.outputs[0]])
    gelu = ir.node("Mul", [hx.outputs[0], plus.outputs[0]])
    out = ir.node("Mul", [gelu.outputs[0], up])
    out.outputs[0].name = "out"
    nodes = [half, c, k, one, sq, cube, cc, inner, scaled, tanh, plus, hx, gelu, out]
    graph = ir.Graph([g, up], [out.outputs[0]], nodes=nodes, opset_imports={"": 18}, name="GeluMul")
    return ir.Function(DOMAIN, "GeluMul", "", graph=graph, attributes=[])


def silu_mul_function() -> ir.Function:
    """The body ORT runs for ai.xcompile.SiluMul: g * sigmoid(g) * up."""
    g, up = ir.Value(name="g"), ir.Value(name="up")
    sig = ir.node("Sigmoid", [g])
    act = ir.node("Mul", [g, sig.outputs[0]])
    out = ir.node("Mul", [act.outputs[0], up])
    out.outputs[0].name = "out"
    graph = ir.Graph(
        [g, up], [out.outputs[0]], nodes=[sig, act, out], opset_imports={"": 18}, name="SiluMul"
    )
    return ir.Function(DOMAIN, "SiluMul", "", graph=graph, attributes=[])


class ActivationPass(RulePass):
    name = "activation"

    def rules(self, model: ir.Model):
        return [SiluMulRule.rule(), FastGeluRule.rule(), GeluRule.rule(), GeluMulRule.rule()]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        for op_type, body in (("SiluMul", silu_mul_function), ("GeluMul", gelu_mul_function)):
            if any(n.domain == DOMAIN and n.op_type == op_type for n in model.graph):
                fn = body()
                model.functions[fn.identifier()] = fn
                model.opset_imports[DOMAIN] = 1
        return result


PASS = ActivationPass
