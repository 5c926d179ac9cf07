import pytest

from tests.passes.conftest import assert_same_outputs, op_counts


@pytest.mark.parametrize(
    "family,fused,norm",
    [
        ("llama", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"),
        ("gptj", "SkipLayerNormalization", "LayerNormalization"),
    ],
)
def test_skip_norm_fuses_residual_add(family, fused, norm, around):
    before, after = around(family, "skip_norm")
    b, a = op_counts(before), op_counts(after)
    # every norm but the first (it reads the embedding, no residual) takes its add with it
    assert a[fused] == b[norm] - 1 and a[norm] == 1
    assert a["Add"] == b["Add"] - a[fused]
    assert_same_outputs(before, after)
