import pytest

from tests.passes.conftest import IDS, assert_same_outputs, op_counts


# half-split full; interleaved partial; half-split partial with longrope
@pytest.mark.parametrize("family", ["llama", "gptj", "phi3"])
def test_rotary_fuses_q_and_k(family, around):
    before, after = around(family, "rotary")
    b, a = op_counts(before), op_counts(after)
    assert b["RotaryEmbedding"] == 0 and a["RotaryEmbedding"] == 2 * 3
    assert a["Neg"] == 0 and a["Cos"] == a["Sin"] == 0 and a["Slice"] == 0
    assert_same_outputs(before, after)


def test_longrope_picks_short_then_long_caches_as_the_primitive_graph(around):
    """Phi-3's longrope (switch at 8 tokens): a 6-token prefill and decode steps at positions
    6 and 7 read the short rows of the stacked caches, the step at position 8 (longest + 1 = 9
    > 8) the long ones; every output agrees with the primitive graph's Where on inv_freq."""
    import numpy as np

    from tests.passes.conftest import run_ort

    before, after = around("phi3", "rotary")
    assert op_counts(after)["ReduceMax"] == 1  # one choice per forward, shared by every layer
    for a, b in zip(run_ort(before, IDS[:6], steps=3), run_ort(after, IDS[:6], steps=3)):
        for name in a:
            assert np.abs(a[name] - b[name]).max() <= 1e-5 * max(1.0, np.abs(a[name]).max())


def test_local_layers_read_their_own_caches(around):
    """Gemma 3: the 5 sliding layers rotate with base 10k tables, the full layer with base 1M
    scaled x1/8; each RotaryEmbedding reads its layer's caches, and every output agrees with the
    primitive graph's per-call tables."""
    import onnx

    before, after = around("gemma3", "rotary")
    graph = onnx.load(str(after / "model.onnx"), load_external_data=False).graph
    caches = {}  # layer -> the cos caches its q and k rotations read
    for n in graph.node:
        if n.op_type == "RotaryEmbedding":
            caches.setdefault(n.name.split("/")[2], []).append(n.input[2])
    assert len(caches) == 6  # layers.0 .. layers.5
    for layer, names in caches.items():
        local = layer != "layers.5"
        assert names == [f"/model/rotary{'_local' if local else ''}/cos_cache"] * 2, layer
    assert op_counts(after)["Cos"] == 0
    assert_same_outputs(before, after)
