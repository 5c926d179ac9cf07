import pytest

from tests.passes.conftest import assert_same_outputs, op_counts


@pytest.mark.parametrize("family,op", [("llama", "SiluMul"), ("gptj", "FastGelu")])
def test_activation_fuses(family, op, around):
    before, after = around(family, "activation")
    b, a = op_counts(before), op_counts(after)
    assert b[op] == 0 and b["Sigmoid"] + b["Tanh"] == 3
    assert a[op] == 3
    assert a["Sigmoid"] == 0 and a["Tanh"] == 0
    assert_same_outputs(before, after)


def test_geglu_fuses_to_gelu_mul(around):
    """Gemma's GeGLU: the tanh GELU of the gate times up becomes one GeluMul (its function body
    runs under onnxruntime, which the outputs are compared on)."""
    before, after = around("gemma2", "activation")
    b, a = op_counts(before), op_counts(after)
    assert b["GeluMul"] == 0 and a["GeluMul"] == 3
    assert a["FastGelu"] == 0
    assert b["Tanh"] - a["Tanh"] == 3  # the soft-caps' Tanh stay
    assert_same_outputs(before, after)
