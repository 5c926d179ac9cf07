"""The decoder-only transformer every supported family is, as a primitive ONNX graph.

A family file (llama.py, gptj.py, ...) turns its config into a `DecoderSpec` and names its weights;
this file emits the graph from the spec. Standard ONNX ops only (opset 17): passes fuse them later.

Graph interface (B batch, S new tokens, P cached tokens, T = P + S):
  inputs   input_ids (B,S) int64, position_ids (B,S) int64,
           past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) float
  outputs  logits (B,S,vocab) float, present.{i}.key / .value (B, kv_heads, T, head_dim) float
The causal (and sliding-window) mask is built in the graph from position_ids and T.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from xcompile.frontend.graph import GraphBuilder


@dataclass(frozen=True)
class WeightNames:
    """Checkpoint tensor names; `{i}` is the layer index. Linear names lack `.weight`/`.bias`."""

    embed: str
    final_norm: str
    lm_head: str
    layer: str  # prefix, e.g. "model.layers.{i}."
    attn_norm: str
    mlp_norm: str | None  # None: parallel residual (attention and MLP read the same normed input)
    q: str
    k: str
    v: str
    o: str
    up: str  # gated MLP: up_proj; plain MLP: fc_in
    down: str
    gate: str | None = None
    q_norm: str | None = None  # RMSNorm over each head's query / key before rotary (Qwen3)
    post_attn_norm: str | None = None  # a norm on attention's output before its residual add
    post_mlp_norm: str | None = None  # and on the MLP's (Gemma 2)
    k_norm: str | None = None
    # linears the checkpoint stores fused, each as the row views (parts) named above, in row
    # order (Phi-3: qkv_proj -> q/k/v, gate_up_proj -> gate/up); the checkpoint reads the parts
    # as byte ranges of the fused tensor (checkpoint.row_views), so the graph sees Llama's linears
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class TensorParallel:
    """How each weight splits across ranks, by name (the part after the layer prefix, or the
    whole name for the embedding and lm_head), gpt-fast style. W is (N, K) as in nn.Linear.
      column: rows split (N/R each; heads of Q/K/V, channels of gate/up), bias split alike
      row:    columns split (K/R each), an AllReduce after, bias added once after it
      vocab:  rows split by token id (embedding table, lm_head)
    Anything else (norms) is replicated."""

    column: tuple[str, ...]
    row: tuple[str, ...]
    vocab: tuple[str, ...]


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    rotary: str  # "half" (rotate_half, Llama) | "interleaved" (rotate_every_two, GPT-J)
    rotary_dim: int
    inv_freq: tuple[float, ...]
    rotary_scale: float  # multiplies cos and sin (1.0 but for some rope types)
    activation: str  # silu | gelu | gelu_tanh | relu
    names: WeightNames
    sliding_window: tuple[int | None, ...] = field(default=())  # per layer
    embed_scale: float = 1.0  # multiplies the embedding rows (Granite's embedding_multiplier)
    residual_scale: float = 1.0  # multiplies attention's and the MLP's outputs before each residual
    attention_scale: float | None = None  # on q·k; None: head_dim^-0.5
    logits_divisor: float = 1.0  # divides the logits (Granite's logits_scaling)
    # longrope: a forward whose longest position + 1 exceeds rope_switch rotates with
    # long_inv_freq instead of inv_freq (as transformers' longrope_frequency_update decides)
    long_inv_freq: tuple[float, ...] = ()
    rope_switch: int = 0
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's (1 + weight)
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) before the mask; 0: none
    final_softcap: float = 0.0  # logits likewise
    # the sliding-window layers' own rotary tables, where they differ from the others' (Gemma 3's
    # local layers: rope_local_base_freq, unscaled); (): every layer rotates with inv_freq
    local_inv_freq: tuple[float, ...] = ()
    local_rotary_scale: float = 1.0

    @property
    def parallel_residual(self) -> bool:
        return self.names.mlp_norm is None

    def features(self) -> list[str]:
        """What this model has beyond the plain decoder, for `xcompile inspect`."""
        found = []
        if self.names.q_norm:
            found.append("q/k RMSNorm per head")
        if self.norm_offset:
            found.append(f"RMSNorm x ({self.norm_offset:g} + weight)")
        if self.names.post_attn_norm:
            found.append("norms after attention and MLP")
        if self.attn_softcap:
            found.append(f"attention soft-cap {self.attn_softcap:g}")
        if self.final_softcap:
            found.append(f"final logit soft-cap {self.final_softcap:g}")
        if self.names.fused:
            found.append("fused " + ", ".join(f.rsplit(".", 1)[-1] for f, _ in self.names.fused))
        if self.long_inv_freq:
            found.append(f"longrope (long factors past {self.rope_switch} tokens)")
        elif self.rotary_scale != 1.0:
            found.append(f"rope scaled x{self.rotary_scale:g}")
        if self.rotary_dim < self.head_dim:
            found.append(f"partial rotary {self.rotary_dim}/{self.head_dim}")
        if self.local_inv_freq:
            local, other = (
                _rope_base(f, self.rotary_dim) for f in (self.local_inv_freq, self.inv_freq)
            )
            found.append(f"sliding layers' rope base {local:g} (others' {other:g})")
        for what, value, plain in (
            ("embedding x", self.embed_scale, 1.0),
            ("residual x", self.residual_scale, 1.0),
            ("attention scale ", self.attention_scale, None),
            ("logits /", self.logits_divisor, 1.0),
        ):
            if value != plain:
                found.append(f"{what}{value:g}")
        windows = sorted({w for w in self.sliding_window if w})
        if windows:
            used = sum(1 for w in self.sliding_window if w)
            found.append(f"sliding window {windows} on {used}/{self.layers} layers")
        return found

    def runtime_config(self) -> dict:
        """What the runtime needs to size its KV cache and check prompts (goes in the manifest)."""
        return {
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab": self.vocab,
            "max_positions": self.max_positions,
            **({"rope_switch": self.rope_switch} if self.long_inv_freq else {}),
            "features": self.features(),
        }


def build(spec: DecoderSpec, b: GraphBuilder) -> None:
    """Emit the whole decoder into `b` (see the module docstring for the interface)."""
    ids = b.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    pos = b.input("position_ids", TensorProto.INT64, ["batch", "seq"])
    past = []
    for i in range(spec.layers):
        shape = ["batch", spec.kv_heads, "past", spec.head_dim]
        past.append(
            (
                b.input(f"past_key_values.{i}.key", TensorProto.FLOAT, shape),
                b.input(f"past_key_values.{i}.value", TensorProto.FLOAT, shape),
            )
        )

    x = embedding(b, spec.names.embed, ids)  # (B,S,H)
    if spec.embed_scale != 1.0:
        x = b.op("Mul", "/model/embed_scale", [x, _scalar(b, spec.embed_scale)])
    tables, local_tables = rotary_tables(spec, b, pos)  # cos, sin (B,1,S,rot) each
    masks = {}
    for i in range(spec.layers):
        window = spec.sliding_window[i] if spec.sliding_window else None
        if window not in masks:
            masks[window] = attention_mask(b, pos, past[0][0], window)
        cos, sin = tables if window is None else local_tables
        x = decoder_layer(spec, b, i, x, past[i], cos, sin, masks[window])
    x = norm(spec, b, "/model/norm", spec.names.final_norm, x)
    lm_head = spec.names.lm_head
    if not b.has_weight(lm_head + ".weight"):  # tied to the embedding table
        lm_head = spec.names.embed.removesuffix(".weight")
    logits = linear(b, "/lm_head", lm_head, x)
    if spec.logits_divisor != 1.0:
        logits = b.op("Div", "/lm_head/logits_scaling", [logits, _scalar(b, spec.logits_divisor)])
    if spec.final_softcap:
        logits = softcap(b, "/lm_head/softcap", logits, spec.final_softcap)
    b.output(logits, "logits", TensorProto.FLOAT, ["batch", "seq", spec.vocab])


def decoder_layer(spec, b, i, x, past, cos, sin, mask):
    n = spec.names
    scope = f"/model/layers.{i}"
    prefix = n.layer.format(i=i)
    h = norm(spec, b, f"{scope}/attn_norm", prefix + n.attn_norm, x)
    attn = attention(spec, b, i, scope + "/attn", prefix, h, past, cos, sin, mask)
    if spec.parallel_residual:  # GPT-J: x + attn(ln(x)) + mlp(ln(x))
        out = mlp(spec, b, scope + "/mlp", prefix, h)
        both = b.op("Add", scope + "/parallel", [attn, out])
        return b.op("Add", scope + "/residual", [x, both])
    if n.post_attn_norm:
        attn = norm(spec, b, f"{scope}/post_attn_norm", prefix + n.post_attn_norm, attn)
    x = b.op("Add", scope + "/attn_residual", [x, _residual_scaled(spec, b, scope + "/attn", attn)])
    h = norm(spec, b, f"{scope}/mlp_norm", prefix + n.mlp_norm, x)
    out = mlp(spec, b, scope + "/mlp", prefix, h)
    if n.post_mlp_norm:
        out = norm(spec, b, f"{scope}/post_mlp_norm", prefix + n.post_mlp_norm, out)
    out = _residual_scaled(spec, b, scope + "/mlp", out)
    return b.op("Add", scope + "/mlp_residual", [x, out])


def softcap(b, scope: str, x: str, cap: float) -> str:
    """cap * tanh(x / cap): x kept within (-cap, cap), nearly unchanged where |x| << cap"""
    return b.op(
        "Mul",
        scope,
        [b.op("Tanh", scope, [b.op("Div", scope, [x, _scalar(b, cap)])]), _scalar(b, cap)],
    )


def _residual_scaled(spec, b, scope, x):
    if spec.residual_scale == 1.0:
        return x
    return b.op("Mul", scope + "/residual_scale", [x, _scalar(b, spec.residual_scale)])


def _rope_base(inv_freq, rotary_dim: int) -> float:
    """theta of inv_freq[i] = theta^(-2i/rotary_dim) / factor, read back from the ratio of the
    first two frequencies (so a linear factor does not hide it)"""
    return (inv_freq[0] / inv_freq[1]) ** (rotary_dim / 2) if len(inv_freq) > 1 else 0.0


def _scalar(b, value: float) -> str:
    return b.const(f"/scalar/{value!r}", value, np.float32)


# -- pieces ---------------------------------------------------------------------------------------


def embedding(b: GraphBuilder, name: str, ids: str) -> str:
    """Gather rows of the stored table, then cast only the rows (not the table) to float."""
    table = b.initializer(name)
    out = b.op("Gather", "/model/embed_tokens", [name, ids], axis=0)
    if table.data_type != TensorProto.FLOAT:
        out = b.op("Cast", "/model/embed_tokens", [out], to=TensorProto.FLOAT)
    return out


def linear(b: GraphBuilder, scope: str, name: str, x: str) -> str:
    """x (..., K) @ W(N, K)ᵀ (+ bias): the checkpoint's nn.Linear layout, transposed in-graph."""
    wt = b.op("Transpose", scope, [b.weight(name + ".weight")], perm=[1, 0])
    y = b.op("MatMul", scope, [x, wt])
    if b.has_weight(name + ".bias"):
        y = b.op("Add", scope + "/bias", [y, b.weight(name + ".bias")])
    return y


def norm(spec: DecoderSpec, b: GraphBuilder, scope: str, name: str, x: str) -> str:
    if spec.norm == "layer":
        return b.op(
            "LayerNormalization",
            scope,
            [x, b.weight(name + ".weight"), b.weight(name + ".bias")],
            axis=-1,
            epsilon=spec.norm_eps,
        )
    # RMSNorm: x * 1/sqrt(mean(x²) + eps) * w, in the op order torch's exporter writes (and
    # onnxscript's fusion rules match)
    sq = b.op("Pow", scope, [x, b.const("/scalar/2.0", 2.0, np.float32)])
    var = b.op(
        "ReduceMean", scope, [sq, b.const("/axes/-1", [-1])], keepdims=1, noop_with_empty_axes=0
    )
    eps = b.const(f"/scalar/eps={spec.norm_eps}", spec.norm_eps, np.float32)
    rms = b.op("Sqrt", scope, [b.op("Add", scope + "/eps", [var, eps])])
    normed = b.op("Mul", scope, [x, b.op("Reciprocal", scope, [rms])])
    weight = b.weight(name + ".weight")
    if spec.norm_offset:  # Gemma: (1 + weight), a constant the plan folds once
        weight = b.op("Add", scope + "/offset", [weight, _scalar(b, spec.norm_offset)])
    return b.op("Mul", scope + "/weight", [normed, weight])


def rotary_tables(spec: DecoderSpec, b: GraphBuilder, pos: str):
    """((cos, sin), (cos, sin) of the sliding-window layers), each (B,1,S,rotary_dim), laid out
    for the family's rotation (half-split or pairs); the second pair is the first unless the
    spec gives local layers their own tables."""
    scope = "/model/rotary"
    tables = _tables(spec, b, pos, scope, spec.inv_freq, spec.rotary_scale, spec.long_inv_freq)
    # what the rotary pass needs to replace these tables by cos/sin caches indexed by position
    facts = {
        "cos": tables[0],
        "sin": tables[1],
        "inv_freq": list(spec.inv_freq),
        "long_inv_freq": list(spec.long_inv_freq),
        "switch": spec.rope_switch,
        "scale": spec.rotary_scale,
        "max_positions": spec.max_positions,
        "interleaved": spec.rotary == "interleaved",
        "rotary_dim": spec.rotary_dim,
        "position_ids": pos,
    }
    local = tables
    if spec.local_inv_freq:
        local = _tables(
            spec, b, pos, "/model/rotary_local", spec.local_inv_freq, spec.local_rotary_scale, ()
        )
        facts["local"] = {
            "cos": local[0],
            "sin": local[1],
            "inv_freq": list(spec.local_inv_freq),
            "scale": spec.local_rotary_scale,
        }
    b.metadata["xcompile.rotary"] = json.dumps(facts)
    return tables, local


def _tables(spec, b, pos, scope, inv_freq, scale, long_inv_freq) -> tuple[str, str]:
    inv = b.const(scope + "/inv_freq", inv_freq, np.float32)  # (rot/2)
    if long_inv_freq:  # longrope: the long factors when max(position) + 1 > switch
        longest = b.op("ReduceMax", scope + "/longest", [pos], keepdims=0)  # scalar
        switch = b.const(scope + "/switch", spec.rope_switch - 1)  # max + 1 > s <=> max > s - 1
        inv = b.op(
            "Where",
            scope + "/long_or_short",
            [
                b.op("Greater", scope + "/long", [longest, switch]),
                b.const(scope + "/long_inv_freq", long_inv_freq, np.float32),
                inv,
            ],
        )
    p = b.op(
        "Cast",
        scope,
        [b.op("Unsqueeze", scope, [pos, b.const("/axes/-1", [-1])])],
        to=TensorProto.FLOAT,
    )  # (B,S,1)
    freqs = b.op("Mul", scope + "/freqs", [p, inv])  # (B,S,rot/2)
    tables = []
    for fn in ("Cos", "Sin"):
        t = b.op(fn, scope, [freqs])
        if scale != 1.0:
            t = b.op("Mul", scope + "/scale", [t, b.const(scope + "/scale", scale, np.float32)])
        if spec.rotary == "half":  # [f0..f(n-1), f0..f(n-1)]
            t = b.op("Concat", scope + "/" + fn, [t, t], axis=-1)
        else:  # [f0, f0, f1, f1, ...]
            t2 = b.op("Unsqueeze", scope + "/" + fn, [t, b.const("/axes/-1", [-1])])
            t = b.op("Concat", scope + "/" + fn, [t2, t2], axis=-1)  # (B,S,rot/2,2)
            t = b.op("Reshape", scope + "/" + fn, [t, b.const("/shape/0,0,-1", [0, 0, -1])])
        tables.append(b.op("Unsqueeze", scope + "/" + fn, [t, b.const("/axes/1", [1])]))
    return tables[0], tables[1]


def rotate(spec: DecoderSpec, b: GraphBuilder, scope: str, x: str, cos: str, sin: str) -> str:
    """Rotary embedding on x (B,n,S,head_dim): x*cos + rotate(x)*sin on the first rotary_dim."""
    d, r = spec.head_dim, spec.rotary_dim
    xr = x
    if r < d:
        xr = _slice(b, scope + "/rot", x, 0, r)
    if spec.rotary == "half":  # rotate_half: (x1, x2) -> (-x2, x1) on the two halves
        x1 = _slice(b, scope + "/x1", xr, 0, r // 2)
        x2 = _slice(b, scope + "/x2", xr, r // 2, r)
        rot = b.op("Concat", scope + "/rotate_half", [b.op("Neg", scope, [x2]), x1], axis=-1)
    else:  # rotate_every_two: pairs (a, b) -> (-b, a)
        pairs = b.op(
            "Reshape",
            scope + "/pairs",
            [xr, b.const(f"/shape/0,0,0,{r // 2},2", [0, 0, 0, r // 2, 2])],
        )
        even = _slice(b, scope + "/even", pairs, 0, 1)
        odd = _slice(b, scope + "/odd", pairs, 1, 2)
        rot = b.op(
            "Concat", scope + "/rotate_every_two", [b.op("Neg", scope, [odd]), even], axis=-1
        )
        rot = b.op(
            "Reshape",
            scope + "/rotate_every_two",
            [rot, b.const(f"/shape/0,0,0,{r}", [0, 0, 0, r])],
        )
    out = b.op(
        "Add",
        scope + "/rotary",
        [b.op("Mul", scope + "/cos", [xr, cos]), b.op("Mul", scope + "/sin", [rot, sin])],
    )
    if r < d:
        out = b.op("Concat", scope + "/pass", [out, _slice(b, scope + "/pass", x, r, d)], axis=-1)
    return out


def attention_mask(b: GraphBuilder, pos: str, past_key: str, window: int | None) -> str:
    """Additive mask (B,1,S,T): 0 where key position k may be seen from query position q
    (k <= q, and k > q - window when there is a sliding window), float32 min elsewhere."""
    scope = "/model/mask" if window is None else f"/model/mask_window{window}"
    total = b.op(
        "Add",
        scope + "/total",
        [
            b.op("Shape", scope + "/past", [past_key], start=2, end=3),
            b.op("Shape", scope + "/new", [pos], start=1, end=2),
        ],
    )  # [T]
    t = b.op("Squeeze", scope, [total, b.const("/axes/0", [0])])
    k = b.op("Range", scope + "/keys", [b.const("/scalar/0", 0), t, b.const("/scalar/1", 1)])
    q = b.op("Unsqueeze", scope + "/queries", [pos, b.const("/axes/1,3", [1, 3])])  # (B,1,S,1)
    allowed = b.op("LessOrEqual", scope + "/causal", [k, q])
    if window is not None:
        low = b.op("Sub", scope + "/window", [q, b.const(f"{scope}/size", window)])
        allowed = b.op("And", scope + "/window", [allowed, b.op("Greater", scope, [k, low])])
    zero = b.const("/scalar/0.0", 0.0, np.float32)
    lowest = b.const("/scalar/float_min", np.finfo(np.float32).min, np.float32)
    return b.op("Where", scope, [allowed, zero, lowest])


def attention(spec, b, i, scope, prefix, h, past, cos, sin, mask) -> str:
    n, d = spec.names, spec.head_dim
    q3 = linear(b, scope + "/q_proj", prefix + n.q, h)  # (B,S,heads*d)
    k3 = linear(b, scope + "/k_proj", prefix + n.k, h)
    if n.q_norm:
        q3 = _head_norm(spec, b, scope + "/q_norm", prefix + n.q_norm, q3)
        k3 = _head_norm(spec, b, scope + "/k_norm", prefix + n.k_norm, k3)
    q = _heads(b, scope + "/q", q3, spec.heads, d)
    k = _heads(b, scope + "/k", k3, spec.kv_heads, d)
    v = _heads(b, scope + "/v", linear(b, scope + "/v_proj", prefix + n.v, h), spec.kv_heads, d)
    q = rotate(spec, b, scope + "/q", q, cos, sin)
    k = rotate(spec, b, scope + "/k", k, cos, sin)
    k = b.op("Concat", scope + "/present_key", [past[0], k], axis=2)  # (B,kv,T,d)
    v = b.op("Concat", scope + "/present_value", [past[1], v], axis=2)
    b.output(k, f"present.{i}.key", TensorProto.FLOAT, ["batch", spec.kv_heads, "total", d])
    b.output(v, f"present.{i}.value", TensorProto.FLOAT, ["batch", spec.kv_heads, "total", d])
    if spec.heads != spec.kv_heads:  # grouped-query: each KV head serves heads/kv_heads queries
        rep = b.const(
            f"/shape/1,1,{spec.heads // spec.kv_heads},1,1",
            [1, 1, spec.heads // spec.kv_heads, 1, 1],
        )
        shape = b.const(f"/shape/0,{spec.heads},-1,{d}", [0, spec.heads, -1, d])
        axis = b.const("/axes/2", [2])
        k, v = (
            b.op(
                "Reshape",
                f"{scope}/repeat_{w}",
                [
                    b.op(
                        "Expand",
                        f"{scope}/repeat_{w}",
                        [b.op("Unsqueeze", f"{scope}/repeat_{w}", [t, axis]), rep],
                    ),
                    shape,
                ],
            )
            for w, t in (("k", k), ("v", v))
        )
    kt = b.op("Transpose", scope + "/k", [k], perm=[0, 1, 3, 2])
    scale = (
        b.const(f"/scalar/{d}^-0.5", d**-0.5, np.float32)
        if spec.attention_scale is None
        else _scalar(b, spec.attention_scale)
    )
    scores = b.op("Mul", scope + "/scale", [b.op("MatMul", scope + "/qk", [q, kt]), scale])
    if spec.attn_softcap:
        scores = softcap(b, scope + "/softcap", scores, spec.attn_softcap)
    probs = b.op("Softmax", scope, [b.op("Add", scope + "/mask", [scores, mask])], axis=-1)
    ctx = b.op("MatMul", scope + "/pv", [probs, v])  # (B,heads,S,d)
    ctx = b.op("Transpose", scope + "/ctx", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", scope + "/ctx", [ctx, b.const("/shape/0,0,-1", [0, 0, -1])])
    return linear(b, scope + "/o_proj", prefix + n.o, ctx)


def mlp(spec, b, scope, prefix, h) -> str:
    n = spec.names
    up = linear(b, scope + ("/up_proj" if n.gate else "/fc_in"), prefix + n.up, h)
    if n.gate:
        gate = activation(spec, b, scope, linear(b, scope + "/gate_proj", prefix + n.gate, h))
        act = b.op("Mul", scope + "/gate", [gate, up])
    else:
        act = activation(spec, b, scope, up)
    return linear(b, scope + ("/down_proj" if n.gate else "/fc_out"), prefix + n.down, act)


def activation(spec, b, scope, x) -> str:
    s = f"{scope}/{spec.activation}"
    if spec.activation == "silu":
        return b.op("Mul", s, [x, b.op("Sigmoid", s, [x])])
    if spec.activation == "relu":
        return b.op("Relu", s, [x])
    half = b.const("/scalar/0.5", 0.5, np.float32)
    one = b.const("/scalar/1.0", 1.0, np.float32)
    if spec.activation == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        inner = b.op(
            "Erf", s, [b.op("Mul", s, [x, b.const("/scalar/1/sqrt2", 2**-0.5, np.float32)])]
        )
    else:  # gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))
        cube = b.op("Mul", s + "/cube", [b.op("Mul", s + "/square", [x, x]), x])
        inner = b.op(
            "Add", s, [x, b.op("Mul", s, [cube, b.const("/scalar/0.044715", 0.044715, np.float32)])]
        )
        inner = b.op(
            "Tanh",
            s,
            [
                b.op(
                    "Mul",
                    s,
                    [inner, b.const("/scalar/sqrt(2/pi)", math.sqrt(2 / math.pi), np.float32)],
                )
            ],
        )
    return b.op("Mul", s, [b.op("Mul", s + "/half", [x, half]), b.op("Add", s, [inner, one])])


ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


def _head_norm(spec, b, scope, name, x3):
    """RMSNorm over each head's d values: (B,S,n*d) -> (B,S,n,d) -> norm -> (B,S,n*d). The head
    count is left to the reshape (-1), so a rank's share of the heads reshapes alike."""
    d = spec.head_dim
    x = b.op("Reshape", scope, [x3, b.const(f"/shape/0,0,-1,{d}", [0, 0, -1, d])])
    x = norm(spec, b, scope, name, x)
    return b.op("Reshape", scope, [x, b.const("/shape/0,0,-1", [0, 0, -1])])


def _heads(b, scope, x, n, d):
    """(B,S,n*d) -> (B,n,S,d)"""
    x = b.op("Reshape", scope, [x, b.const(f"/shape/0,0,{n},{d}", [0, 0, n, d])])
    return b.op("Transpose", scope, [x], perm=[0, 2, 1, 3])


def _slice(b, scope, x, start, end):
    return b.op(
        "Slice",
        scope,
        [
            x,
            b.const(f"/scalar1d/{start}", [start]),
            b.const(f"/scalar1d/{end}", [end]),
            b.const("/axes/-1", [-1]),
        ],
    )
