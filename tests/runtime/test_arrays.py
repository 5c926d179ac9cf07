"""The runtime's own readings of what it no longer imports: BF16 bits (runtime/arrays.py) held
to torch's bfloat16, bit for bit, and model.onnx's tensors and attributes (runtime/onnx_file.py)
held to onnx's numpy_helper and helper."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from xcompile.runtime import onnx_file
from xcompile.runtime.arrays import BF16, round_bf16, widen

SPECIAL = [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40, 3.4e38, -3.4e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8]


def test_round_bf16_is_torch_rounding_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(50_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 50_000),
            np.array(SPECIAL, dtype=np.float32),
        ]
    ).astype(np.float32)
    ours = round_bf16(x)
    assert ours.dtype == BF16 and ours.shape == x.shape
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours.view(np.uint16), theirs)
    back = torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(widen(ours), back)  # widening is exact


def test_round_bf16_keeps_nan_a_nan():
    ours = widen(round_bf16(np.array([np.nan, -np.nan], dtype=np.float32)))
    assert np.isnan(ours).all()


TENSORS = {
    "float32": np.array([[1.5, -2.25], [3.0, 1e-7]], dtype=np.float32),
    "int64": np.array([-(2**40), 7, 0], dtype=np.int64),
    "int32": np.array([1, -2, 3], dtype=np.int32),
    "int8": np.array([-128, 5, 127], dtype=np.int8),
    "uint8": np.array([[0, 255]], dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "float16": np.array([0.5, -65504.0], dtype=np.float16),
    "float64": np.array([np.pi], dtype=np.float64),
    "scalar": np.array(3, dtype=np.int64),
}


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("name", sorted(TENSORS))
def test_to_array_is_numpy_helpers(name, raw):
    value = TENSORS[name]
    if raw:
        tensor = numpy_helper.from_array(value, name)
    else:  # the typed repeated fields (int32_data, float_data, ...)
        dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor = helper.make_tensor(name, dtype, value.shape, value.reshape(-1).tolist())
        assert not tensor.HasField("raw_data")
    ours = onnx_file.to_array(tensor)
    theirs = numpy_helper.to_array(tensor)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_to_array_reads_bfloat16_bits(raw):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    tensor = helper.make_tensor("b", onnx.TensorProto.BFLOAT16, [3], values.tolist(), raw=False)
    if raw:
        bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
        tensor = helper.make_tensor("b", onnx.TensorProto.BFLOAT16, [3], bits.tobytes(), raw=True)
    ours = onnx_file.to_array(tensor)
    assert ours.dtype == BF16
    np.testing.assert_array_equal(widen(ours), values)


def test_attribute_values_are_helpers():
    node = helper.make_node(
        "X",
        ["a"],
        ["b"],
        f=1.5,
        i=-3,
        s="text",
        t=numpy_helper.from_array(np.ones(2, np.float32)),
        floats=[1.0, 2.0],
        ints=[4, 5],
        strings=["p", "q"],
    )
    for attribute in node.attribute:
        assert onnx_file.attribute_value(attribute) == helper.get_attribute_value(attribute)


def test_load_model_imports_no_onnx_and_reads_the_same_graph(compiled):
    art = compiled("llama")
    code = (
        "import sys; from xcompile.runtime.onnx_file import load_model; "
        f"m = load_model({str(art / 'model.onnx')!r}); "
        "print(len(m.graph.node), len(m.graph.initializer)); "
        "print(sorted(k for k in ('onnx', 'ml_dtypes', 'torch') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    counts, loaded = out.stdout.splitlines()
    theirs = onnx.load(str(art / "model.onnx"), load_external_data=False)
    assert counts == f"{len(theirs.graph.node)} {len(theirs.graph.initializer)}"
    assert loaded == "[]"
