"""Activations -> one op each.

    g ─► Sigmoid ─► Mul(g, ·) ─► Mul(·, up)          ==>  ai.xcompile.SiluMul(g, up)
    0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x³)))   ==>  com.microsoft.FastGelu(x)
    0.5 x (1 + Erf(x / sqrt 2))                      ==>  com.microsoft.Gelu(x)

ONNX Runtime has no SiLU·mul op, so SiluMul lives in domain ai.xcompile with a model-local
function body (Sigmoid, Mul, Mul): onnxruntime inlines it, xrun binds it to its csrc kernel.
"""

from __future__ import annotations

import math

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
        return [SiluMulRule.rule(), FastGeluRule.rule(), GeluRule.rule()]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if any(n.domain == DOMAIN and n.op_type == "SiluMul" for n in model.graph):
            fn = silu_mul_function()
            model.functions[fn.identifier()] = fn
            model.opset_imports[DOMAIN] = 1
        return result


PASS = ActivationPass
