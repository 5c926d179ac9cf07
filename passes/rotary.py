"""Rotary embedding -> com.microsoft RotaryEmbedding on the (B, S, heads*d) projection.

    x3 ─► Reshape(0,0,n,d) ─► Transpose(0,2,1,3) ─► x                       (B, n, S, d)
    [partial: xr = Slice(x, 0:r), pass = Slice(x, r:d)]
    half-split:   rot = Concat(-xr[r/2:r], xr[0:r/2])
    interleaved:  rot = Reshape(Concat(-odd, even)) of Reshape(xr, (.., r/2, 2))
    out = xr * cos + rot * sin   [partial: Concat(out, pass)]
  ==>
    Transpose(Reshape(RotaryEmbedding(x3, position_ids, cos_cache, sin_cache,
                                      interleaved, num_heads=n, rotary_embedding_dim=r)))

cos_cache / sin_cache (max_positions, r/2) are made here from the frontend's inv_freq and scale
(model metadata `xcompile.rotary`), replacing the cos/sin tables the graph computed per call.

longrope (long_inv_freq and a switch length in the facts): the caches hold the short tables in
rows 0..M-1 and the long ones in rows M..2M-1, and RotaryEmbedding reads them at
    position_ids + M * (ReduceMax(position_ids) + 1 > switch)
so a forward picks one set for all its tokens, as transformers' longrope_frequency_update does.

Local tables (facts["local"]: the sliding-window layers' own inv_freq and scale, Gemma 3's
rope_local_base_freq): their cos/sin tables get caches of their own (/model/rotary_local/...),
and the rules matching rotations by those tables point RotaryEmbedding at them.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from xcompile.passes._rules import RulePass, constant

ORDER = 30
PERM = [0, 2, 1, 3]


class RotaryRule(pattern.RewriteRuleClassBase):
    def __init__(
        self,
        interleaved: bool,
        partial: bool,
        facts: dict,
        positions: ir.Value,
        cos_cache: ir.Value,
        sin_cache: ir.Value,
        tag: str = "",
    ):
        kind = ("interleaved" if interleaved else "half") + ("_partial" if partial else "")
        super().__init__(f"rotary_{kind}{tag}")
        self.interleaved, self.partial, self.facts = interleaved, partial, facts
        self.positions, self.cos_cache, self.sin_cache = positions, cos_cache, sin_cache

    def pattern(
        self, op, x3, shape, cos, sin, a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, q0, q1, q2
    ):
        x = op.Transpose(op.Reshape(x3, shape), perm=PERM)
        xr = op.Slice(x, p0, p1, p2) if self.partial else x
        if self.interleaved:
            pairs = op.Reshape(xr, a0)
            even = op.Slice(pairs, a1, a2, a3)
            odd = op.Slice(pairs, a4, a5, a6)
            rot = op.Reshape(op.Concat(op.Neg(odd), even, axis=-1), a7)
        else:
            first = op.Slice(xr, a1, a2, a3)
            second = op.Slice(xr, a4, a5, a6)
            rot = op.Concat(op.Neg(second), first, axis=-1)
        out = op.Add(op.Mul(xr, cos), op.Mul(rot, sin))
        if self.partial:
            out = op.Concat(out, op.Slice(x, q0, q1, q2), axis=-1)  # the pass-through dims
        return out

    def check(self, context, shape, cos, sin, p1=None, q0=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        f = self.facts
        if cos.name != f["cos"] or sin.name != f["sin"]:
            return result.fail("cos/sin are not the frontend's rotary tables")
        dims = constant(shape)
        if dims is None or dims.shape != (4,):
            return result.fail("head reshape is not a constant (0, 0, n, d)")
        rotary_dim = int(dims[3])
        if self.partial:
            end, start = constant(p1), constant(q0)
            if end is None or start is None or end.size != 1 or end.item() != start.item():
                return result.fail("partial rotary slices do not meet")
            rotary_dim = int(end.item())
        if rotary_dim != f["rotary_dim"] or bool(f["interleaved"]) != self.interleaved:
            return result.fail("rotation differs from the frontend's rotary facts")
        return result

    def rewrite(self, op, x3, shape, **_):
        f = self.facts
        dims = constant(shape)
        rot = op.RotaryEmbedding(
            x3,
            self.positions,
            self.cos_cache,
            self.sin_cache,
            _domain="com.microsoft",
            interleaved=int(self.interleaved),
            num_heads=int(dims[2]),
            rotary_embedding_dim=int(f["rotary_dim"]) if self.partial else 0,
        )
        return op.Transpose(op.Reshape(rot, shape), perm=PERM)


class RotaryPass(RulePass):
    name = "rotary"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raw = model.metadata_props.get("xcompile.rotary")
        if raw is None:
            self.rewrites = 0
            return ir.passes.PassResult(model, modified=False)
        self.facts = json.loads(raw)
        return super().call(model)

    def rules(self, model: ir.Model):
        f = self.facts
        graph = model.graph
        positions = next(v for v in graph.inputs if v.name == f["position_ids"])
        sets = [f["inv_freq"]] + ([f["long_inv_freq"]] if f.get("long_inv_freq") else [])
        rows = positions
        if len(sets) > 1:
            rows = _long_or_short(graph, positions, f["switch"], f["max_positions"])
        rules = _rules(f, rows, _caches(graph, "/model/rotary", sets, f["scale"], f))
        if f.get("local"):  # the sliding-window layers' tables: one set, read at the positions
            local = {**f, **f["local"]}
            caches = _caches(graph, "/model/rotary_local", [local["inv_freq"]], local["scale"], f)
            rules += _rules(local, positions, caches, "_local")
        return rules


def _caches(graph: ir.Graph, scope: str, sets: list, scale: float, f: dict) -> list[ir.Value]:
    """cos/sin caches (sets * max_positions, r/2), computed as the graph computed them per call"""
    inv = np.stack([np.asarray(s, dtype=np.float32) for s in sets])  # (sets, r/2)
    steps = np.arange(f["max_positions"], dtype=np.float32)[None, :, None]
    freqs = (steps * inv[:, None, :]).reshape(-1, inv.shape[1])  # (sets * M, r/2)
    caches = []
    for name, fn in (("cos", np.cos), ("sin", np.sin)):
        table = (fn(freqs) * np.float32(scale)).astype(np.float32)
        value = ir.Value(name=f"{scope}/{name}_cache", const_value=ir.tensor(table))
        graph.register_initializer(value)
        caches.append(value)
    return caches


def _rules(facts: dict, positions: ir.Value, caches: list[ir.Value], tag: str = "") -> list:
    return [
        RotaryRule.rule(interleaved, partial, facts, positions, *caches, tag)
        for interleaved in (False, True)
        for partial in (False, True)
    ]


def _long_or_short(graph: ir.Graph, positions: ir.Value, switch: int, rows: int) -> ir.Value:
    """position_ids (B,S) -> the rows of the stacked caches: + rows when the longest position
    + 1 exceeds the switch (the long set), as they are otherwise."""
    scope = "/model/rotary/longrope"

    def const(name, value):
        v = ir.Value(name=f"{scope}/{name}", const_value=ir.tensor(np.array(value, np.int64)))
        graph.register_initializer(v)
        return v

    longest = ir.node(
        "ReduceMax", [positions], attributes={"keepdims": 0}, name=f"{scope}/ReduceMax"
    )
    long = ir.node(
        "Greater", [longest.outputs[0], const("switch", switch - 1)], name=f"{scope}/Greater"
    )
    as_int = ir.node(
        "Cast", [long.outputs[0]], attributes={"to": ir.DataType.INT64}, name=f"{scope}/Cast"
    )
    offset = ir.node("Mul", [as_int.outputs[0], const("rows", rows)], name=f"{scope}/Mul")
    shifted = ir.node("Add", [positions, offset.outputs[0]], name=f"{scope}/Add")
    graph.insert_before(graph.node(0), [longest, long, as_int, offset, shifted])
    return shifted.outputs[0]


PASS = RotaryPass
