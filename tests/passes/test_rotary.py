import pytest

from tests.passes.conftest import assert_same_outputs, op_counts


@pytest.mark.parametrize("family", ["llama", "gptj"])  # half-split full; interleaved partial
def test_rotary_fuses_q_and_k(family, around):
    before, after = around(family, "rotary")
    b, a = op_counts(before), op_counts(after)
    assert b["RotaryEmbedding"] == 0 and a["RotaryEmbedding"] == 2 * 3
    assert a["Neg"] == 0 and a["Cos"] == a["Sin"] == 0 and a["Slice"] == 0
    assert_same_outputs(before, after)
