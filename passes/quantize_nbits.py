"""Weight-only quantized MatMuls -> com.microsoft MatMulNBits, ONNX Runtime's layout.

    x ─► MatMul(Transpose(Cast?(W)))       ==>  x ─► MatMulNBits(B, scales[, zero_points])
                                                      K, N, bits, block_size
Layout (written by the quantize driver, xcompile/quantize.py, from neural-compressor's RTN
or our own searched RTN, GPTQ or AWQ):
    B            uint8 (N, k_blocks, block_size * bits / 8); INT4: element 2j of a block in the
                 low nibble of byte j, 2j + 1 in the high nibble; the last block zero-padded
    scales       float32 (N, k_blocks); or float16 (llama.cpp's Q4_0 / Q8_0 block scale: 0.5 bit a
                 weight less at blocks of 32), read through Cast(to=FLOAT), since ONNX Runtime's
                 MatMulNBits takes scales of A's type (xrun's kernels read the float16 as stored)
    zero_points  absent (symmetric: ORT then uses 2^(bits-1));
                 uint8: INT8 (N, k_blocks); INT4 (N, ceil(k_blocks / 2)), two per byte;
                 or float32 (N, k_blocks), not packed (ORT's "same type as A"): a block's offset
                 need not be a whole level, as llama.cpp's Q4_1 / Q4_K mins; float16 (behind a
                 Cast, as the scales) where the scales are
    W[n, k] = (q[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]
Which weights, and each one's bits / group size / zero points, is the caller's plan (a
`layout_for(node_name, weight_name) -> Layout | None`): weights can differ, as llama.cpp's
Q4_K_M keeps some tensors at more bits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from xcompile.passes.concat_matmul import weight_chain

MS = "com.microsoft"


def block_size_for(group_size: int, k: int) -> int:
    """MatMulNBits wants a power of two >= 16. Per channel (-1): one block of the next power of
    two >= K, unless a power of two >= 64 divides K: then blocks of the largest such, each with
    the row's scale repeated, so no row is padded (K = 5632: 11 blocks of 512, where one block of
    8192 would store and read 45 % padding)."""
    if group_size > 0:
        return group_size
    divides = k & -k if k > 0 else 0  # the largest power of two dividing K
    if divides >= 64:
        return divides
    size = 16
    while size < k:
        size *= 2
    return size


@dataclass(frozen=True)
class Layout:
    """How one weight is stored as MatMulNBits."""

    bits: int  # 8 or 4
    group_size: int  # weights per scale along K; -1: per output channel
    zero_points: str = "none"  # none (symmetric) | uint8 | float
    scales: str = "float32"  # float32 | float16: the scales', and float zero points', dtype

    @property
    def sym(self) -> bool:
        return self.zero_points == "none"

    def describe(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_points": self.zero_points,
            "scales": self.scales,
        }


def uniform(layout: Layout, quantize_lm_head: bool = False) -> Callable[[str, str], Layout | None]:
    """Every projection in one layout; lm_head too if asked."""

    def layout_for(node_name: str, weight_name: str) -> Layout | None:
        if node_name.startswith("/lm_head/") and not quantize_lm_head:
            return None
        return layout

    return layout_for


def nbits_names(weight: str) -> tuple[str, str, str]:
    stem = weight.removesuffix(".weight")
    return f"{stem}.qweight", f"{stem}.scales", f"{stem}.zero_points"


def scales_input(g: ir.Graph, name: str) -> ir.Value:
    """What a MatMulNBits reads as the scales (or zero points) stored in initializer `name`: the
    initializer (float32, uint8), or the output of the Cast that widens float16 ones."""
    stored = g.initializers[name]
    if stored.dtype != ir.DataType.FLOAT16:
        return stored
    for user, _ in stored.uses():
        if user.op_type == "Cast":
            return user.outputs[0]
    raise ValueError(f"{name} is float16 with no Cast to float")


def stored_scales(value: ir.Value) -> ir.Value:
    """scales_input's inverse: the initializer behind a MatMulNBits' (or gather's) scales."""
    node = value.producer()
    return node.inputs[0] if node is not None and node.op_type == "Cast" else value


class QuantizeNBitsPass(ir.passes.InPlacePass):
    name = "quantize_nbits"

    def __init__(self, layout_for: Callable[[str, str], Layout | None], accuracy_level: int = 4):
        """layout_for(node name, weight name): how to store that MatMul's weight, None to leave
        it as it is. accuracy_level: MatMulNBits' own attribute. 4 lets the runtime round
        activations to int8 (AVX512_VNNI: 64 multiply-adds an instruction, ~0.3 % relative
        error per output, as llama.cpp's Q8 activations and ONNX Runtime's int8 compute); 0
        keeps them fp32."""
        super().__init__()
        self.layout_for = layout_for
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        plan: dict[str, dict] = {}
        self.rewrites = 0
        for node in list(g):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            found = weight_chain(node.inputs[1])
            if found is None:
                continue
            weight, chain = found
            layout = self.layout_for(node.name, weight.name)
            if layout is None:
                continue
            half = layout.scales == "float16"
            bits = layout.bits
            n, k = (int(d) for d in weight.shape)
            block = block_size_for(layout.group_size, k)
            k_blocks = -(-k // block)
            blob = block * bits // 8
            qname, sname, zname = nbits_names(weight.name)
            if weight.name not in plan:
                plan[weight.name] = {
                    "bits": bits,
                    "block_size": block,
                    "sym": layout.sym,
                    "group_size": layout.group_size,
                    "zero_points": layout.zero_points,
                    "scales": layout.scales,
                    "N": n,
                    "K": k,
                }
                floats = ir.DataType.FLOAT16 if half else ir.DataType.FLOAT
                specs = [
                    (qname, ir.DataType.UINT8, (n, k_blocks, blob)),
                    (sname, floats, (n, k_blocks)),
                ]
                if layout.zero_points == "float":
                    specs.append((zname, floats, (n, k_blocks)))
                elif layout.zero_points == "uint8":
                    zcols = k_blocks if bits == 8 else -(-k_blocks // 2)
                    specs.append((zname, ir.DataType.UINT8, (n, zcols)))
                for name, dtype, shape in specs:
                    nbytes = int(dtype.itemsize)
                    for d in shape:
                        nbytes *= d
                    tensor = ir.ExternalTensor(
                        location="rank0.safetensors",
                        offset=0,
                        length=nbytes,
                        dtype=dtype,
                        shape=ir.Shape(shape),
                        name=name,
                        base_dir="",
                    )
                    g.register_initializer(
                        ir.Value(
                            name=name,
                            shape=tensor.shape,
                            type=ir.TensorType(dtype),
                            const_value=tensor,
                        )
                    )
            scope = node.name.rsplit("/", 1)[0]
            if half and not g.initializers[sname].uses():  # the weight's first MatMulNBits
                halves = [sname] + ([zname] if layout.zero_points == "float" else [])
                for name in halves:
                    widen = ir.node(
                        "Cast",
                        [g.initializers[name]],
                        attributes={"to": ir.DataType.FLOAT},
                        name=f"{scope}/{name.rsplit('.', 1)[-1]}_float",
                    )
                    widen.outputs[0].name = f"{name}_float"
                    widen.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                    g.insert_before(node, [widen])
            inputs = [node.inputs[0], g.initializers[qname], scales_input(g, sname)]
            if not layout.sym:
                inputs.append(scales_input(g, zname))
            q = ir.node(
                "MatMulNBits",
                inputs,
                domain=MS,
                name=f"{scope}/MatMulNBits",
                attributes={
                    "K": k,
                    "N": n,
                    "bits": bits,
                    "block_size": block,
                    "accuracy_level": self.accuracy_level,
                },
            )
            g.insert_before(node, [q])
            out = q.outputs[0]
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            ir.convenience.replace_all_uses_with(node.outputs[0], out)
            g.remove(node, safe=True)
            self.rewrites += 1
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)  # the Transpose/Cast chains that fed the MatMuls
        for name in [n for n in plan if n in g.initializers and not g.initializers[n].uses()]:
            g.initializers.pop(name)
        model.opset_imports.setdefault(MS, 1)
        model.metadata_props["xcompile.nbits"] = json.dumps(plan)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)
