import pytest
import torch
from safetensors import safe_open

from tests.passes.conftest import assert_same_outputs, op_counts


@pytest.mark.parametrize("family,groups_per_layer", [("llama", 2), ("qwen2", 2), ("gptj", 1)])
def test_projections_reading_one_input_become_one_matmul(family, groups_per_layer, around):
    before, after = around(family, "concat_matmul")
    b, a = op_counts(before), op_counts(after)
    assert a["Split"] == 3 * groups_per_layer
    merged = {"llama": 3 + 2, "qwen2": 3 + 2, "gptj": 4}[family]  # q,k,v + gate,up / +fc_in
    assert a["MatMul"] == b["MatMul"] - 3 * (merged - groups_per_layer)
    assert_same_outputs(before, after)


def test_concatenated_weight_is_the_rows_of_its_parts(around, checkpoint):
    _, after = around("llama", "concat_matmul")
    with (
        safe_open(str(after / "rank0.safetensors"), "pt") as art,
        safe_open(str(checkpoint("llama") / "model.safetensors"), "pt") as src,
    ):
        qkv = art.get_tensor("model.layers.1.self_attn.q_proj+k_proj+v_proj.weight")
        parts = [src.get_tensor(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"]
        assert torch.equal(qkv, torch.cat(parts))
        assert "model.layers.1.self_attn.q_proj.weight" not in art.keys()  # noqa: SIM118 (safe_open has keys(), no __contains__)
