"""The tp and allreduce_merge passes: collectives where the table says, heads split."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

from xcompile.passes import tp
from xcompile.shard import family_table


def sharded(art, family, rank=0, ranks=2, merge=True):
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    concat, _ = tp.concat_recipes(model)
    header = __import__("xcompile.artifacts", fromlist=["x"]).read_safetensors_header(
        art / "rank0.safetensors"
    )
    slicing = tp.slicing_table(family_table(family), list(header), concat)
    return tp.shard_graph(model, slicing, rank, ranks, f"rank{rank}.safetensors", merge)


def layer_collectives(graph: onnx.GraphProto) -> Counter:
    return Counter(
        n.op_type
        for n in graph.node
        if n.domain == "ai.xcompile" and n.name.startswith("/model/layers.")
    )


def test_gptj_parallel_residual_has_one_allreduce_per_layer(compiled):
    art = compiled("gptj")
    before = sharded(art, "gptj", merge=False).graph
    after = sharded(art, "gptj").graph
    assert layer_collectives(before)["AllReduce"] == 6
    assert layer_collectives(after)["AllReduce"] == 3
    # the embedding lookup (vocab-parallel) adds one, the lm_head gathers its vocab slices
    assert Counter(n.op_type for n in after.node if n.domain == "ai.xcompile") == {
        "AllReduce": 4,
        "AllGather": 1,
    }


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sequential_residual_has_two_allreduces_per_layer(family, compiled):
    after = sharded(compiled(family), family).graph
    assert layer_collectives(after)["AllReduce"] == 2 * 3


def test_heads_and_split_sizes_are_per_rank(compiled):
    graph = sharded(compiled("llama"), "llama").graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: a.i for a in gqa[0].attribute}
    assert attrs["num_heads"] == 2 and attrs["kv_num_heads"] == 1  # 4 and 2 over 2 ranks


def test_heads_that_do_not_divide_are_refused(compiled):
    from xcompile.errors import UserError
    from xcompile.shard import shard

    with pytest.raises(UserError, match="do not split over 3 ranks"):
        shard(compiled("llama"), 3, compiled("llama").parent / "x")
