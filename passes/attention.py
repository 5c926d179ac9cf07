"""Attention over the KV cache -> com.microsoft GroupQueryAttention.

    q3, k3, v3 (B,S,n*d) ─► Reshape ─► Transpose ─► q, k, v                  (B, heads, S, d)
    present_k = Concat(past_k, k, axis=2)          present_v likewise          (B, kv, T, d)
    [GQA: Reshape(Expand(Unsqueeze(present, 2), (1,1,heads/kv,1,1)))]
    ctx = Softmax(q @ Kᵀ * scale + mask) @ V ─► Transpose ─► Reshape          (B, S, heads*d)
    [soft-capped: q @ Kᵀ * scale -> cap * Tanh(· / cap) before the mask (Gemma 2)]
  ==>
    ctx, present_k, present_v = GroupQueryAttention(q3, k3, v3, past_k, past_v, seqlens_k,
                                    total_sequence_length, num_heads, kv_num_heads, scale,
                                    local_window_size, softcap)

The mask must be the frontend's causal mask, optionally with a sliding window of W keys (a query
sees itself and the W - 1 keys before it), which is ORT's local_window_size = W (checked against
onnxruntime in the tests). seqlens_k is the index of the last key (T - 1), as ORT defines it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from xcompile.passes._rules import RulePass, constant, scalar

ORDER = 40
PERM = [0, 2, 1, 3]


def causal_window(mask: ir.Value) -> tuple[bool, int]:
    """(is the frontend's causal mask, window W or 0)."""
    where = mask.producer()
    if where is None or where.op_type != "Where":
        return False, 0
    cond = where.inputs[0].producer()
    if cond is not None and cond.op_type == "LessOrEqual":
        return True, 0
    if cond is None or cond.op_type != "And":
        return False, 0
    parts = [v.producer() for v in cond.inputs]
    kinds = sorted(p.op_type for p in parts if p is not None)
    if kinds != ["Greater", "LessOrEqual"]:
        return False, 0
    greater = next(p for p in parts if p.op_type == "Greater")
    low = greater.inputs[1].producer()
    if low is None or low.op_type != "Sub":
        return False, 0
    window = scalar(low.inputs[1])
    return (True, int(window)) if window is not None else (False, 0)


class GroupQueryAttentionRule(pattern.RewriteRuleClassBase):
    def __init__(self, grouped: bool, capped: bool = False):
        name = f"gqa_{'grouped' if grouped else 'mha'}{'_softcap' if capped else ''}"
        super().__init__(name)
        self.grouped, self.capped = grouped, capped

    def pattern(
        self,
        op,
        q3,
        k3,
        v3,
        qs,
        ks,
        vs,
        past_k,
        past_v,
        axis,
        rep,
        shape_k,
        shape_v,
        scale,
        mask,
        out_shape,
        cap,
        cap_again,
    ):
        q = op.Transpose(op.Reshape(q3, qs), perm=PERM)
        k = op.Transpose(op.Reshape(k3, ks), perm=PERM)
        v = op.Transpose(op.Reshape(v3, vs), perm=PERM)
        present_k = op.Concat(past_k, k, axis=2)
        present_v = op.Concat(past_v, v, axis=2)
        keys, values = present_k, present_v
        if self.grouped:
            keys = op.Reshape(op.Expand(op.Unsqueeze(present_k, axis), rep), shape_k)
            values = op.Reshape(op.Expand(op.Unsqueeze(present_v, axis), rep), shape_v)
        scores = op.Mul(op.MatMul(q, op.Transpose(keys, perm=[0, 1, 3, 2])), scale)
        if self.capped:
            scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap_again)
        probs = op.Softmax(op.Add(scores, mask), axis=-1)
        ctx = op.Reshape(op.Transpose(op.MatMul(probs, values), perm=PERM), out_shape)
        return ctx, present_k, present_v

    def check(
        self, context, qs, ks, past_k, past_v, scale, mask, cap=None, cap_again=None, **_
    ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if self.capped and (scalar(cap) is None or scalar(cap) != scalar(cap_again)):
            return result.fail("soft-cap is not cap * tanh(x / cap) with one constant cap")
        if not (past_k.is_graph_input() and past_v.is_graph_input()):
            return result.fail("past key/value are not graph inputs (no KV cache)")
        q_dims, k_dims = constant(qs), constant(ks)
        if q_dims is None or k_dims is None or len(q_dims) != 4 or len(k_dims) != 4:
            return result.fail("head reshapes are not constants (0, 0, n, d)")
        if scalar(scale) is None:
            return result.fail("attention scale is not a constant")
        causal, _ = causal_window(mask)
        if not causal:
            return result.fail("mask is not the frontend's causal mask")
        return result

    def rewrite(self, op, q3, k3, v3, qs, ks, past_k, past_v, scale, mask, cap=None, **_):
        _, window = causal_window(mask)
        one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int64)))
        axis0 = op.Constant(value=ir.tensor(np.array([0], dtype=np.int64)))
        # T and B from layer 0's cache and input_ids where the graph has them: every layer's
        # lengths are the same, so after CSE one subgraph serves all layers (not 9 nodes each)
        first_past, ids = _shared_inputs(past_k)
        rows = ids if ids is not None else q3
        total = op.Add(op.Shape(first_past, start=2, end=3), op.Shape(rows, start=1, end=2))  # [T]
        seqlens_k = op.Expand(
            op.Cast(op.Sub(total, one), to=ir.DataType.INT32), op.Shape(rows, start=0, end=1)
        )  # (B,) = T - 1
        total_len = op.Cast(op.Squeeze(total, axis0), to=ir.DataType.INT32)
        return op.GroupQueryAttention(
            q3,
            k3,
            v3,
            past_k,
            past_v,
            seqlens_k,
            total_len,
            _domain="com.microsoft",
            _outputs=3,
            num_heads=int(constant(qs)[2]),
            kv_num_heads=int(constant(ks)[2]),
            scale=float(scalar(scale)),
            local_window_size=window if window else -1,
            **({"softcap": float(scalar(cap))} if self.capped else {}),
        )


def _shared_inputs(past_k: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """(layer 0's past key, input_ids (B, S)) among the graph's inputs, else (past_k, None)."""
    graph = past_k.graph
    if graph is None:
        return past_k, None
    by_name = {v.name: v for v in graph.inputs}
    return by_name.get("past_key_values.0.key", past_k), by_name.get("input_ids")


class AttentionPass(RulePass):
    name = "attention"

    def rules(self, model: ir.Model):
        return [
            GroupQueryAttentionRule.rule(grouped, capped)
            for grouped in (True, False)
            for capped in (False, True)
        ]


PASS = AttentionPass
