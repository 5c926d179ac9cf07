"""The families beyond Llama's block (Qwen3, Granite, Phi-3, Gemma 2 and 3): what their fused
graphs hold per decoder layer, what `xcompile inspect` says of them, Phi-3's fused tensors read
as row views, and a feature nobody implements refused with one line."""

from __future__ import annotations

import json
import re
from collections import Counter

import onnx
import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli_errors import no_output, run, user_error

# ops per decoder layer in the fused graph (measured on the 3-layer toys; Llama's is the base)
FUSED_LAYER = {
    "llama": {
        "GroupQueryAttention": 1,
        "RotaryEmbedding": 2,
        "SkipSimplifiedLayerNormalization": 2,
    },
    # q_norm, k_norm: a SimplifiedLayerNormalization each, between reshapes to heads and back
    "qwen3": {
        "GroupQueryAttention": 1,
        "RotaryEmbedding": 2,
        "SkipSimplifiedLayerNormalization": 2,
        "SimplifiedLayerNormalization": 2,
        "Reshape": 4,
    },
    # the residual multiplier stays a Mul before each residual add
    "granite": {
        "GroupQueryAttention": 1,
        "RotaryEmbedding": 2,
        "SkipSimplifiedLayerNormalization": 2,
        "Mul": 2,
    },
    "phi3": {"GroupQueryAttention": 1, "RotaryEmbedding": 2, "SkipSimplifiedLayerNormalization": 2},
    # the soft-cap inside GroupQueryAttention; the norms after attention and the MLP fused too;
    # (1 + weight) an Add per norm on constants (folded when the plan is built); GeGLU one
    # GeluMul (the gate's tanh GELU times up)
    "gemma2": {
        "GroupQueryAttention": 1,
        "RotaryEmbedding": 2,
        "SkipSimplifiedLayerNormalization": 2,
        "SimplifiedLayerNormalization": 2,
        "Add": 4,
        "GeluMul": 1,
        "FastGelu": 0,
        "Mul": 0,
        "Tanh": 0,
    },
    # Gemma 2's (no soft-caps here) with Qwen3's q/k norms (their Reshapes), each with its
    # (1 + weight) Add;
    # layer 1 is a sliding one, its RotaryEmbeddings on the local caches (tests/passes)
    "gemma3": {
        "GroupQueryAttention": 1,
        "RotaryEmbedding": 2,
        "SkipSimplifiedLayerNormalization": 2,
        "SimplifiedLayerNormalization": 4,
        "Reshape": 4,
        "Add": 6,
        "GeluMul": 1,
        "FastGelu": 0,
        "Mul": 0,
        "Tanh": 0,
    },
}


def layer_ops(art, i: int = 1) -> Counter:
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    return Counter(n.op_type for n in graph.node if n.name.startswith(f"/model/layers.{i}/"))


@pytest.mark.parametrize("family", sorted(FUSED_LAYER))
def test_fused_layer_holds_the_fused_ops_and_no_primitive_norm_or_rotary(family, compiled):
    ops = layer_ops(compiled(family))
    for op, count in FUSED_LAYER[family].items():
        assert ops[op] == count, (op, ops)
    for op in ("Pow", "ReduceMean", "Sqrt", "Softmax", "Neg", "Cos", "Sin", "Slice"):
        assert ops[op] == 0, (op, ops)
    assert ops["MatMul"] == 4  # QKV, o_proj, gate+up, down
    extra = sum(ops.values()) - sum(layer_ops(compiled("llama")).values())
    assert (
        extra
        == {"llama": 0, "qwen3": 6, "granite": 2, "phi3": 0, "gemma2": 6, "gemma3": 14}[family]
    )


@pytest.mark.parametrize(
    "family,says",
    [
        ("qwen3", ["q/k RMSNorm per head", "sliding window [6] on 2/3 layers"]),
        ("granite", ["embedding x3", "residual x0.5", "attention scale 0.0625", "logits /2"]),
        ("phi3", ["fused qkv_proj, gate_up_proj", "longrope (long factors past 8 tokens)"]),
        (
            "gemma2",
            [
                "RMSNorm x (1 + weight)",
                "norms after attention and MLP",
                "attention soft-cap 0.5",
                "final logit soft-cap 2",
                "sliding window [6] on 2/3 layers",
            ],
        ),
        (
            "gemma3",
            [
                "q/k RMSNorm per head",
                "RMSNorm x (1 + weight)",
                "norms after attention and MLP",
                "sliding layers' rope base 10000 (others' 1e+06)",
                "sliding window [6] on 5/6 layers",
            ],
        ),
    ],
)
def test_inspect_names_the_family_and_its_features(family, says, compiled, tmp_path):
    res = run(tmp_path, "xcompile", "inspect", compiled(family))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["family", family]
    assert lines[1].startswith("features ")
    for words in says:
        assert words in lines[1], lines[1]


def test_phi3_views_are_the_fused_rows(checkpoint):
    """q/k/v and gate/up, read as byte ranges of qkv_proj and gate_up_proj, are their rows."""
    from xcompile.frontend.checkpoint import Checkpoint
    from xcompile.quantize import read_tensor

    ckpt = Checkpoint.open(checkpoint("phi3"))
    stored = load_file(ckpt.path / "model.safetensors")
    layer = "model.layers.2."
    with open(ckpt.path / "model.safetensors", "rb") as f:

        def read(name):
            return read_tensor(ckpt.path, ckpt.tensors[name][1], f)

        qkv = torch.cat([read(layer + f"self_attn.{p}_proj.weight") for p in "qkv"])
        gate_up = torch.cat([read(layer + f"mlp.{p}_proj.weight") for p in ("gate", "up")])
        assert read(layer + "self_attn.q_proj.weight").shape == (4 * 16, 64)
        assert read(layer + "self_attn.k_proj.weight").shape == (2 * 16, 64)
    assert torch.equal(qkv, stored[layer + "self_attn.qkv_proj.weight"])
    assert torch.equal(gate_up, stored[layer + "mlp.gate_up_proj.weight"])


@pytest.mark.parametrize(
    "family,rope",
    [
        ("qwen3", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        (
            "granite",
            {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 8,
            },
        ),
    ],
    ids=["qwen3-dynamic", "granite-longrope"],
)
def test_rope_type_nobody_implements_is_one_line_exit_2(family, rope, checkpoint, tmp_path):
    """dynamic NTK (recomputed for every length) and longrope outside Phi-3 (no frontend picks
    its tables): refused before any work, no output left."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint(family), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = rope
    (ckpt / "config.json").write_text(json.dumps(cfg))
    res = run(tmp_path, "xcompile", "quantize", ckpt, "-o", tmp_path / "out", "--fp32")
    line = user_error(res, "rope_type", "not supported")
    assert re.search(r"dynamic|longrope", line)
    no_output(tmp_path)


def _edited(checkpoint, tmp_path, family, **changes):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint(family), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def test_gemma3_with_a_vision_tower_is_one_line_exit_2(checkpoint, tmp_path):
    """Gemma3ForConditionalGeneration (text model, SigLIP tower, projector): named, with what
    to use instead."""
    ckpt = _edited(
        checkpoint,
        tmp_path,
        "gemma3",
        architectures=["Gemma3ForConditionalGeneration"],
        model_type="gemma3",
    )
    res = run(tmp_path, "xcompile", "quantize", ckpt, "-o", tmp_path / "out", "--fp32")
    user_error(res, "Gemma3ForConditionalGeneration", "vision tower", "Gemma3ForCausalLM")
    no_output(tmp_path)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "made_up", "rope_theta": 10000.0},
    ],
    ids=["dynamic", "unknown"],
)
def test_gemma3_local_rope_nobody_implements_is_one_line_exit_2(rope, checkpoint, tmp_path):
    """The sliding layers' rope settings are checked as the full layers' are."""
    cfg = json.loads((checkpoint("gemma3") / "config.json").read_text())
    params = {**cfg["rope_parameters"], "sliding_attention": rope}
    ckpt = _edited(checkpoint, tmp_path, "gemma3", rope_parameters=params)
    res = run(tmp_path, "xcompile", "quantize", ckpt, "-o", tmp_path / "out", "--fp32")
    user_error(res, rope["rope_type"])
    no_output(tmp_path)
