"""Tied embeddings, quantized: the lookup reads the lm_head's blocks (passes/quantized_embedding.py)
and the artifacts store the table once. Held to the same graph with the lookup reading the
blocks dequantized by the reference as a float32 table: bit for bit on our runtime (kernels,
references, replayed decode steps, xrun), to 1e-4 under onnxruntime, and TP=2 to TP=1."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from tests.conftest import run_xrun
from xcompile.passes.quantize_nbits import nbits_names
from xcompile.runtime import kernels
from xcompile.runtime.arrays import to_torch
from xcompile.runtime.generate import generate
from xcompile.runtime.model import Model
from xcompile.runtime.sampling import Sampler, SamplingParams
from xcompile.runtime.tokenizer import TextTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog and then"
TABLE = "model.embed_tokens.weight"
LOOKUPS = ("GatherBlockQuantized", "GatherNBits")
# scheme -> (WeightOnly arguments, the lookup op it gives); accuracy_level 0 (fp32 activations)
# so that onnxruntime's MatMulNBits computes what ours does
SCHEMES = {
    "mixed": (dict(bits=4, group_size=32, sym=True, mixed=True), "GatherBlockQuantized"),
    "int4-g32": (dict(bits=4, group_size=32, sym=True, quantize_lm_head=True), LOOKUPS[0]),
    "int4-uint8-zp": (dict(bits=4, group_size=32, sym=False, quantize_lm_head=True), LOOKUPS[0]),
    "int4-float-zp": (
        dict(bits=4, group_size=32, sym=False, quantize_lm_head=True, float_zero_points=True),
        "GatherNBits",
    ),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """tied(scheme, lookup=True) -> artifacts of a tied-embedding Llama (SmolLM2's shape),
    quantized; lookup=False: without the quantized_embedding pass (the float table kept)."""
    from xcompile.toy import make_checkpoint

    ckpt = make_checkpoint("llama", tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)
    made = {}

    def get(scheme: str, lookup: bool = True):
        from xcompile.passes.quantized_embedding import QuantizedEmbeddingPass
        from xcompile.quantize import quantize
        from xcompile.weight_only import WeightOnly

        if (scheme, lookup) not in made:
            out = tmp_path_factory.mktemp(f"tied-{scheme}-{lookup}") / "artifacts"
            kind = WeightOnly(**SCHEMES[scheme][0], accuracy_level=0)
            call = QuantizedEmbeddingPass.call
            if not lookup:
                QuantizedEmbeddingPass.call = lambda self, model: __import__(
                    "onnx_ir"
                ).passes.PassResult(model, modified=False)
            try:
                quantize(ckpt, out, f"int{kind.bits}", progress=False, scheme=kind)
            finally:
                QuantizedEmbeddingPass.call = call
            made[scheme, lookup] = out
        return made[scheme, lookup]

    return get


def reference(art, use_kernels: bool = True, kv_cache: str = "auto") -> Model:
    """The same artifacts with the lookup replaced by Gather(W, input_ids), W (V, H) float32 the
    lm_head's blocks dequantized by the reference."""
    model = Model.load(art, use_kernels=use_kernels, kv_cache=kv_cache)
    graph = copy.deepcopy(model.graph)
    nodes = list(graph.graph.node)
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    B, scales, zero_points = (to_torch(model.weights.get(name)) for name in nbits_names(TABLE))
    table = kernels.dequantize_nbits_reference(
        B, scales, zero_points, attrs["bits"], attrs["block_size"], attrs["K"]
    )
    lookup = [n for n in nodes if n.name.startswith("/model/embed_tokens/")]
    assert lookup and any(n.op_type in LOOKUPS for n in lookup)
    rows = lookup[-1].output[0]  # (Reshape,) the lookup, (Slice): the last gives the rows
    gather = helper.make_node("Gather", ["dequantized_table", "input_ids"], [rows], axis=0)
    kept = [n for n in nodes if n not in lookup]
    del graph.graph.node[:]
    graph.graph.node.extend([gather, *kept])
    graph.graph.initializer.append(numpy_helper.from_array(table.numpy(), "dequantized_table"))
    return Model(
        model.root, model.manifest, graph, model.weights, use_kernels, model.comm, model.kv_dtype
    )


def greedy(model: Model, n: int = 16) -> list[int]:
    ids = TextTokenizer(model.root).encode(PROMPT)
    return generate(model, ids, n, Sampler(SamplingParams()), eos_ids=set()).tokens


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_table_is_stored_once(scheme, tied):
    from xcompile.artifacts import read_safetensors_header

    graph = onnx.load(str(tied(scheme) / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count(SCHEMES[scheme][1]) == 1 and "Gather" not in ops
    names = {i.name for i in graph.initializer}
    assert TABLE not in names and nbits_names(TABLE)[0] in names
    assert TABLE not in read_safetensors_header(tied(scheme) / "rank0.safetensors")


def test_the_file_is_smaller_by_the_table(tied):
    from xcompile.artifacts import read_safetensors_header

    before, after = tied("mixed", lookup=False), tied("mixed")
    header = read_safetensors_header(before / "rank0.safetensors")
    table = header[TABLE].nbytes  # BF16 (V, H)
    assert header[TABLE].dtype == "BF16" and table == 512 * 64 * 2
    saved = (before / "rank0.safetensors").stat().st_size - (
        after / "rank0.safetensors"
    ).stat().st_size
    assert table <= saved < table + 256  # and the header's entry for it


@pytest.mark.parametrize("kernels_", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_equal_the_graph_reading_the_dequantized_table(scheme, kernels_, tied):
    ids = TextTokenizer(tied(scheme)).encode(PROMPT)
    ours, ref = Model.load(tied(scheme), use_kernels=kernels_), reference(tied(scheme), kernels_)
    a_cache, b_cache = ours.new_cache(len(ids) + 1), ref.new_cache(len(ids) + 1)
    assert np.array_equal(ours.forward(ids, 0, a_cache), ref.forward(ids, 0, b_cache))
    assert np.array_equal(ours.forward([5], len(ids), a_cache), ref.forward([5], len(ids), b_cache))


@pytest.mark.parametrize("scheme", ["mixed", "int4-float-zp"])
def test_replayed_decode_steps_look_up_each_steps_token(scheme, tied):
    """The lookup is one csrc call reading the ids through their pointer: it goes on the tape
    (not re-run as Python), and replayed steps still give the reference's tokens."""
    from xcompile import _C
    from xcompile.runtime.replay import NATIVE, PYTHON

    model = Model.load(tied(scheme))
    tokens = greedy(model)
    assert model.plan.replayed > 0
    assert tokens == greedy(reference(tied(scheme)))
    (program,) = [p for key, p in model.plan._ready.items() if key[0] == ((0, 1),)]
    steps = model.plan.steps
    assert any(kind == NATIVE and fn is _C.gather_nbits for kind, fn, _ in program.entries)
    python = [steps[i].name for kind, i, _ in program.entries if kind == PYTHON]
    assert not any(op in name for name in python for op in LOOKUPS), python


def test_xrun_gives_the_references_tokens(tied):
    art = tied("mixed")
    # this random model may greedily reach EOS, where xrun stops and greedy() does not: the two
    # agree up to there, and xrun's last token is then the EOS
    args = ["--max-new-tokens", "16", "--temperature", "0", "--kv-cache", "float32"]
    got = run_xrun([str(art), "--prompt", PROMPT, *args])["tokens"]
    want = greedy(reference(art, kv_cache="float32"))
    assert len(got) >= 6 and got == want[: len(got)], (got, want)
    if len(got) < 16:
        eos = json.loads((art / "generation_config.json").read_text()).get("eos_token_id")
        assert got[-1] in (eos if isinstance(eos, list) else [eos]), (got, eos)


@pytest.mark.parametrize("scheme", ["mixed", "int4-uint8-zp"])
def test_onnxruntime_runs_the_graph_and_agrees(scheme, tied):
    """GatherBlockQuantized is ONNX Runtime's contrib op: the single-rank graph runs there."""
    from tests.passes.conftest import IDS, run_ort

    art = tied(scheme)
    prefill, step = run_ort(art, IDS, steps=1)
    model = Model.load(art, kv_cache="float32")  # onnxruntime's cache is FP32
    cache = model.new_cache(len(IDS) + 1)
    scale = max(1.0, float(abs(prefill["logits"]).max()))
    ours = torch.from_numpy(model.forward(IDS, 0, cache))
    assert (ours - torch.from_numpy(prefill["logits"][0])).abs().max().item() <= 1e-4 * scale
    ours = torch.from_numpy(model.forward([5], len(IDS), cache))
    assert (ours - torch.from_numpy(step["logits"][0])).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("scheme", ["mixed", "int4-float-zp"])
def test_tp2_gives_tp1_tokens(scheme, tied, tmp_path):
    """The lookup is vocab-parallel as the float one was: each rank's rows, ids outside them
    masked, then an AllReduce."""
    from xcompile.shard import shard

    art = tied(scheme)
    shard(art, 2, tmp_path / "tp2", progress=False)
    graph = onnx.load(str(tmp_path / "tp2" / "rank1.onnx"), load_external_data=False).graph
    producer = {out: n for n in graph.node for out in n.output}
    lookup = next(n for n in graph.node if n.op_type in LOOKUPS)
    assert producer[lookup.input[1]].op_type == "Where"  # ids inside this rank's rows, else 0
    (mask,) = [n for n in graph.node if lookup.output[0] in n.input]
    assert mask.op_type == "Mul"
    assert any(n.op_type == "AllReduce" and mask.output[0] in n.input for n in graph.node)
    args = ["--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "0"]
    one = run_xrun([str(art), *args])
    two = run_xrun([str(tmp_path / "tp2"), *args])
    assert two["ranks"] == 2 and two["tokens"] == one["tokens"]
