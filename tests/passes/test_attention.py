import pytest

from tests.passes.conftest import assert_same_outputs, op_counts


@pytest.mark.parametrize("family", ["llama", "mistral", "gptj"])  # GQA; MQA + window; MHA
def test_attention_becomes_group_query_attention(family, around):
    before, after = around(family, "attention")
    b, a = op_counts(before), op_counts(after)
    assert a["GroupQueryAttention"] == 3
    assert a["Softmax"] == 0 and a["Where"] == 0
    # the sequence lengths (seqlens_k, total_sequence_length) computed once for all 3 layers
    assert a["Expand"] == 1 and a["Squeeze"] == 1 and a["Sub"] == 1
    assert b["Softmax"] == 3
    assert_same_outputs(before, after)
