"""Each pass is run on real compiled artifacts: the graph with every pass before it, and the
graph with it too, both executed by onnxruntime on the same inputs (prefill and a decode step)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from xcompile.passes import names

IDS = [1, 50, 60, 70, 80, 90, 100, 7, 8, 9, 10, 11, 12, 13]


def run_ort(art, ids=IDS, steps=1):
    """prefill `ids`, then `steps` decode steps of token 5 -> every output of every call"""
    sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = json.loads((art / "manifest.json").read_text())["config"]
    names_out = [o.name for o in sess.get_outputs()]
    past = {
        f"present.{i}.{k}": np.zeros((1, cfg["kv_heads"], 0, cfg["head_dim"]), np.float32)
        for i in range(cfg["layers"])
        for k in ("key", "value")
    }
    results, start, tokens = [], 0, ids
    for _ in range(1 + steps):
        feeds = {
            "input_ids": np.array([tokens]),
            "position_ids": np.arange(start, start + len(tokens))[None],
        }
        feeds.update({n.replace("present", "past_key_values"): v for n, v in past.items()})
        out = dict(zip(names_out, sess.run(names_out, feeds)))
        results.append(out)
        past = {k: v for k, v in out.items() if k.startswith("present")}
        start += len(tokens)
        tokens = [5]
    return results


def op_counts(art) -> Counter:
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    return Counter(n.op_type for n in graph.node)


@pytest.fixture(scope="session")
def around(compiled):
    """around(family, pass) -> (artifacts before the pass, artifacts after it)"""

    def get(family: str, name: str):
        order = names()
        i = order.index(name)
        return compiled(family, passes=order[:i]), compiled(family, passes=order[: i + 1])

    return get


def assert_same_outputs(before, after, atol=1e-5):
    """Every output of every call agrees, relative to its scale where that exceeds 1: fused
    kernels reassociate sums, which moves a logit of magnitude 10 by about 1e-5 too, and the
    rotary caches' cos/sin (numpy's) differ from onnxruntime's Cos/Sin by an ulp or two, which
    moves a key of magnitude 5 (Phi-3's toy) by 2e-5."""
    for a, b in zip(run_ort(before), run_ort(after)):
        assert a.keys() == b.keys()
        for name in a:
            scale = max(1.0, float(np.abs(a[name]).max()))
            assert np.abs(a[name] - b[name]).max() <= atol * scale, name
