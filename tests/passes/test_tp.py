"""The tp and allreduce_merge passes: collectives where the table says, heads split."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch

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


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "granite", "phi3"])
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


@pytest.mark.parametrize("kind", ["column", "row", "row-channel"])
@pytest.mark.parametrize("zp_kind", ["uint8", "float"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weight_sharded_two_ways_equals_unsharded(bits, zp_kind, kind):
    """A MatMulNBits weight (B, scales, zero points) cut for 2 ranks: column-parallel rank
    outputs concatenated, row-parallel ones (x split along K) summed, give the unsharded matmul.
    K = 192 in blocks of 32 leaves each row-parallel rank 3 blocks (INT4 packed zero points: an
    odd count, repacked); row-channel: one block of 256 per row, re-padded per rank. Float32 zero
    points have the scales' shape and must be cut as the scales are."""
    from xcompile.runtime import kernels

    n, k, ranks = 48, 192, 2
    block = 256 if kind == "row-channel" else 32
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(n, k, generator=gen) + 0.3  # off-centre blocks: zero points far from 2^(b-1)
    weight = kernels.quantize_nbits_reference(w, bits, block, False, zp_kind == "float")
    assert weight[2].dtype == (torch.float32 if zp_kind == "float" else torch.uint8)
    x = torch.randn(3, k, generator=gen)
    expected = kernels.linear_nbits(x, *weight, bits, block, k)
    outputs = []
    for rank in range(ranks):
        parts = []
        for role, t in zip(("qweight", "scales", "zero_points"), weight):
            rule = tp.Slicing(kind.split("-")[0], role=role, nbits=(bits, block, k))
            part = rule.apply(t, rank, ranks, [])
            assert tuple(part.shape) == rule.shape(role, tuple(t.shape), ranks), role
            assert part.dtype == t.dtype
            parts.append(part.contiguous())
        if kind == "column":
            outputs.append(kernels.linear_nbits(x, *parts, bits, block, k))
        else:
            per_rank, rank_block, _ = rule.row_blocks(ranks)
            xr = x[:, rank * per_rank : (rank + 1) * per_rank].contiguous()
            outputs.append(kernels.linear_nbits(xr, *parts, bits, rank_block, per_rank))
    got = torch.cat(outputs, dim=1) if kind == "column" else sum(outputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
