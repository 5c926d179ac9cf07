"""The primitive graph is real ONNX: onnx.checker accepts it, onnxruntime runs it with its KV
cache inputs/outputs, and its logits agree with transformers' (prefill and one decode step)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import FAMILIES

IDS = [1, 50, 60, 70, 80, 90, 100, 7, 8, 9, 10, 11, 12, 13]


def run_ort(art, ids, past=None):
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = __import__("json").loads((art / "manifest.json").read_text())["config"]
    start = 0 if past is None else past["present.0.key"].shape[2]
    feeds = {"input_ids": np.array([ids]), "position_ids": np.arange(start, start + len(ids))[None]}
    for i in range(cfg["layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = (
                np.zeros((1, cfg["kv_heads"], 0, cfg["head_dim"]), np.float32)
                if past is None
                else past[f"present.{i}.{kind}"]
            )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_transformers(family, compiled, hf_model):
    art = compiled(family, passes=[])
    onnx.checker.check_model(str(art / "model.onnx"))
    hf = hf_model(family)
    first = run_ort(art, IDS)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(first["logits"][0] - ref).max() <= 1e-4
    nxt = int(ref[-1].argmax())
    step = run_ort(art, [nxt], past=first)
    assert step["present.0.key"].shape[2] == len(IDS) + 1
    with torch.no_grad():
        ref2 = hf(torch.tensor([IDS + [nxt]])).logits[0, -1].numpy()
    assert np.abs(step["logits"][0, -1] - ref2).max() <= 1e-4


def test_node_names_are_readable(compiled):
    graph = onnx.load(
        str(compiled("llama", passes=[]) / "model.onnx"), load_external_data=False
    ).graph
    names = {n.name for n in graph.node}
    assert "/model/layers.2/attn/q_proj/MatMul" in names
    assert "/model/layers.0/mlp/down_proj/MatMul" in names
    assert "/lm_head/MatMul" in names
    assert len(names) == len(graph.node)  # unique


def test_weights_are_external_references_into_the_shard(compiled):
    graph = onnx.load(
        str(compiled("llama", passes=[]) / "model.onnx"), load_external_data=False
    ).graph
    external = [i for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 3 * 9 + 3  # 9 per layer, embed, final norm, lm_head
    for init in external:
        where = {e.key: e.value for e in init.external_data}
        assert where["location"] == "rank0.safetensors"
        assert not init.raw_data
