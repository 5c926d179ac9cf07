"""Reading model.onnx without `import onnx`: its package __init__ pulls in ml_dtypes (~0.55 s, it
registers every float8/float4 type) and the whole helper API (~0.1 s), for what the runtime needs
from it: the protobuf classes, a TensorProto's values and an attribute's value. The classes come
from onnx's own generated onnx_ml_pb2.py, loaded by path (~25 ms); protobuf hands out one class
per message name, so they are onnx.ModelProto itself should onnx be imported too (the compile
side, tests).

    model = load_model(path)            # onnx.ModelProto, external data not loaded
    to_array(tensor) -> ndarray         # numpy_helper.to_array, BF16 as arrays.BF16 bits
    attribute_value(attr)               # onnx.helper.get_attribute_value
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np

from xcompile.runtime.arrays import BF16

_pb2 = None


def proto():
    """onnx's onnx_ml_pb2 module (ModelProto, TensorProto, ...)."""
    global _pb2
    if _pb2 is None:
        if "onnx" in sys.modules:
            from onnx import onnx_ml_pb2 as module
        else:
            spec = importlib.util.find_spec("onnx")
            if spec is None or not spec.submodule_search_locations:
                from xcompile.errors import UserError

                raise UserError(
                    "the onnx package is missing; pip install xcompile (it depends on onnx)"
                )
            path = Path(spec.submodule_search_locations[0]) / "onnx_ml_pb2.py"
            spec = importlib.util.spec_from_file_location("xcompile.runtime._onnx_ml_pb2", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        _pb2 = module
    return _pb2


def load_model(path: str | Path):
    """The ModelProto in `path` (its external data, the weights, left where they are)."""
    model = proto().ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    return model


# TensorProto.DataType -> (numpy dtype, the repeated field its values sit in when not raw)
_TYPES = {
    1: (np.dtype(np.float32), "float_data"),
    2: (np.dtype(np.uint8), "int32_data"),
    3: (np.dtype(np.int8), "int32_data"),
    4: (np.dtype(np.uint16), "int32_data"),
    5: (np.dtype(np.int16), "int32_data"),
    6: (np.dtype(np.int32), "int32_data"),
    7: (np.dtype(np.int64), "int64_data"),
    9: (np.dtype(np.bool_), "int32_data"),
    10: (np.dtype(np.float16), "int32_data"),  # the bits, one per int32
    11: (np.dtype(np.float64), "double_data"),
    12: (np.dtype(np.uint32), "uint64_data"),
    13: (np.dtype(np.uint64), "uint64_data"),
    16: (BF16, "int32_data"),  # the bits, one per int32
}


def to_array(tensor) -> np.ndarray:
    """A TensorProto's values (raw or in its typed field) as a fresh ndarray of its shape."""
    entry = _TYPES.get(tensor.data_type)
    if entry is None:
        raise ValueError(f"tensor {tensor.name!r}: ONNX data type {tensor.data_type} not supported")
    dtype, field = entry
    shape = tuple(tensor.dims)
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape).copy()
    values = getattr(tensor, field)
    if dtype in (BF16, np.dtype(np.float16)):  # bit patterns, one per int32
        bits = np.array(values, dtype=np.int32).astype(np.uint16)
        return bits.view(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


# AttributeProto.AttributeType -> how its value is read
_ATTRIBUTES = {
    1: lambda a: a.f,
    2: lambda a: a.i,
    3: lambda a: a.s,
    4: lambda a: a.t,
    5: lambda a: a.g,
    6: lambda a: list(a.floats),
    7: lambda a: list(a.ints),
    8: lambda a: list(a.strings),
    9: lambda a: list(a.tensors),
    10: lambda a: list(a.graphs),
}


def attribute_value(attribute) -> Any:
    """An AttributeProto's value, as onnx.helper.get_attribute_value gives it."""
    read = _ATTRIBUTES.get(attribute.type)
    if read is None:
        raise ValueError(f"attribute {attribute.name!r}: type {attribute.type} not supported")
    return read(attribute)
