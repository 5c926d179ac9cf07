from tests.passes.conftest import assert_same_outputs, op_counts


def test_rmsnorm_fuses_and_keeps_outputs(around):
    before, after = around("llama", "rmsnorm")
    b, a = op_counts(before), op_counts(after)
    layers = 3
    assert b["ReduceMean"] == 2 * layers + 1 and b["Sqrt"] == 2 * layers + 1
    assert a["SimplifiedLayerNormalization"] == 2 * layers + 1
    assert a["ReduceMean"] == a["Sqrt"] == a["Reciprocal"] == a["Pow"] == 0
    assert_same_outputs(before, after)
