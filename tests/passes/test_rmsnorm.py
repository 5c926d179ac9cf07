from tests.passes.conftest import assert_same_outputs, op_counts


def test_rmsnorm_fuses_and_keeps_outputs(around):
    before, after = around("llama", "rmsnorm")
    b, a = op_counts(before), op_counts(after)
    layers = 3
    assert b["ReduceMean"] == 2 * layers + 1 and b["Sqrt"] == 2 * layers + 1
    assert a["SimplifiedLayerNormalization"] == 2 * layers + 1
    assert a["ReduceMean"] == a["Sqrt"] == a["Reciprocal"] == a["Pow"] == 0
    assert_same_outputs(before, after)


def test_rmsnorm_fuses_the_norm_of_a_cast_embedding(compiled):
    # BF16 embeddings are cast to FP32 before the first norm, and the residual Add reads that
    # cast too: onnxscript's rule alone left this one norm as 7 primitive ops
    primitive = op_counts(compiled("llama", "bf16", passes=[]))
    assert primitive["Cast"] >= 1 and primitive["ReduceMean"] == 2 * 3 + 1
    fused = op_counts(compiled("llama", "bf16", passes=["rmsnorm"]))
    assert fused["SimplifiedLayerNormalization"] == 2 * 3 + 1
    assert fused.get("ReduceMean", 0) == fused.get("Pow", 0) == 0


def test_rmsnorm_fuses_qwen3_head_norms(around):
    """Qwen3's q_norm / k_norm (over head_dim, between two reshapes) fuse like the layer norms:
    4 per layer, plus the final norm."""
    before, after = around("qwen3", "rmsnorm")
    b, a = op_counts(before), op_counts(after)
    assert b["ReduceMean"] == 4 * 3 + 1
    assert a["SimplifiedLayerNormalization"] == 4 * 3 + 1
    assert a.get("ReduceMean", 0) == a.get("Pow", 0) == 0
    assert_same_outputs(before, after)
