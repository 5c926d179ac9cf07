"""Tensor parallelism: one rank's slice of a fused single-rank graph, and how to slice each weight.

Each family declares, in its frontend file, which weights are column-, row- and vocab-parallel
(`TENSOR_PARALLEL`); this pass applies the table to rank r of R:

    column (Q/K/V, gate/up, fc_in)   W (N, K) -> rows r*N/R .. ; bias likewise
    row (o_proj, down_proj, fc_out)  W (N, K) -> columns r*K/R .. ;
                                     MatMul ─► AllReduce ─► [Add(bias), added once] ─► ...
    vocab embedding                  rows of token ids r*V/R ..: Gather(W_r, id - offset), rows
                                     of ids outside the slice zeroed, then AllReduce (a lookup
                                     on the lm_head's quantized blocks, GatherBlockQuantized or
                                     GatherNBits, likewise: passes/quantized_embedding.py)
    vocab lm_head                    MatMul(h, W_rᵀ) [+ bias_r] ─► AllGather(axis=-1)
    attention                        GroupQueryAttention / RotaryEmbedding heads / R;
                                     the fused projections' Split sizes / R
AllReduce and AllGather are ai.xcompile ops (ONNX Runtime has none). A concatenated weight
(passes/concat_matmul.py) slices each of its parts and concatenates the slices. A MatMulNBits
weight's scales and zero points follow its rows (column) or its blocks along K (row); INT4 zero
points packed two to a byte are unpacked, sliced and repacked, float32 ones (the scales' shape)
are sliced as the scales are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from xcompile.errors import UserError
from xcompile.passes.concat_matmul import weight_chain
from xcompile.passes.quantize_nbits import stored_scales

DOMAIN = "ai.xcompile"


@dataclass(frozen=True)
class Slicing:
    kind: str  # column | row | vocab | replicated
    parts: tuple[str, ...] = ()  # for a concatenated weight: the parts, in row order
    role: str | None = None  # a quantized weight's qweight | scales | zero_points
    nbits: tuple[int, int, int] | None = None  # (bits, block_size, K) of that weight
    source: str = ""  # the weight it stands for (itself, or the one quantized into it)

    def row_blocks(self, ranks: int) -> tuple[int, int, bool]:
        """Row split of a quantized weight -> (K per rank, its block size, whole blocks?)."""
        bits, block, k = self.nbits
        if k % ranks:
            raise UserError(f"K={k} does not split over {ranks} ranks")
        per_rank = k // ranks
        if per_rank % block == 0:
            return per_rank, block, True
        if block >= k:  # one block per row (per channel): re-pad each rank's columns
            from xcompile.passes.quantize_nbits import block_size_for

            return per_rank, block_size_for(-1, per_rank), False
        raise UserError(
            f"a group size of {block} does not split K={k} over {ranks} ranks; "
            "quantize with a smaller --group-size or use fewer ranks"
        )

    def packed_zero_points(self, columns: int) -> bool:
        """Whether this is a quantized weight's INT4 zero points two to a byte (uint8), rather
        than one per block like the scales (INT8, or float32 zero points). From the columns
        alone: they differ wherever the weight has more than one block, and where it has one the
        two readings slice alike."""
        bits, block, k = self.nbits
        return self.role == "zero_points" and bits == 4 and columns != -(-k // block)

    def shape(self, name: str, shape: tuple[int, ...], ranks: int) -> tuple[int, ...]:
        if self.kind == "replicated":
            return shape
        if self.kind == "row" and self.role is not None:
            bits = self.nbits[0]
            per_rank, block, whole = self.row_blocks(ranks)
            n = shape[0]
            if not whole:  # per channel: one (re-padded) block; scales/zero points unchanged
                return (n, 1, block * bits // 8) if self.role == "qweight" else shape
            if self.role == "qweight":
                return (n, per_rank // block, block * bits // 8)
            if self.packed_zero_points(shape[1]):
                return (n, -(-(per_rank // block) // 2))
            return (n, per_rank // block)
        axis = -1 if self.kind == "row" else 0
        if shape[axis] % ranks:
            raise UserError(
                f"{name}: {shape[axis]} {'columns' if axis else 'rows'} do not split "
                f"over {ranks} ranks; choose a --ranks that divides it"
            )
        if axis == 0:
            return (shape[0] // ranks, *shape[1:])
        return (*shape[:-1], shape[-1] // ranks)

    def apply(self, t, rank: int, ranks: int, part_rows: list[int]):
        """t: the whole tensor (torch or numpy) -> this rank's slice (a view where it can)."""
        if self.kind == "replicated":
            return t
        if self.kind == "row" and self.role is not None:
            return self._row_nbits(t, rank, ranks)
        if self.kind == "row":
            n = t.shape[-1] // ranks
            return t[..., rank * n : (rank + 1) * n]
        if not self.parts:
            n = t.shape[0] // ranks
            return t[rank * n : (rank + 1) * n]
        if len(part_rows) != len(self.parts):
            raise UserError(
                "artifacts lack the row counts of their concatenated weights; "
                "rebuild them with this xcompile version"
            )
        pieces, start = [], 0
        for rows in part_rows:
            n = rows // ranks
            pieces.append(t[start + rank * n : start + (rank + 1) * n])
            start += rows
        import torch

        return torch.cat(pieces) if isinstance(t, torch.Tensor) else np.concatenate(pieces)

    def _row_nbits(self, t, rank: int, ranks: int):
        """Columns r*K/R .. of a quantized weight, in MatMulNBits' layout (torch uint8/f32)."""
        import torch

        bits, block, k = self.nbits
        per_rank, new_block, whole = self.row_blocks(ranks)
        if not whole:
            if self.role != "qweight":
                return t  # one scale (and zero point) per row serves every column
            n = t.shape[0]
            q = _elements(t.reshape(n, -1), bits)[:, rank * per_rank : (rank + 1) * per_rank]
            padded = torch.zeros(n, new_block, dtype=torch.uint8)
            padded[:, :per_rank] = q
            return _packed(padded, bits).reshape(n, 1, new_block * bits // 8)
        kb = per_rank // block
        if self.packed_zero_points(t.shape[1]):
            z = _elements(t, 4)[:, rank * kb : (rank + 1) * kb]
            if kb % 2:
                z = torch.cat([z, torch.full((z.shape[0], 1), 8, dtype=torch.uint8)], dim=1)
            return _packed(z, 4)
        return t[:, rank * kb : (rank + 1) * kb]


def _elements(packed, bits: int):
    """uint8 (N, bytes) -> one uint8 per element (N, elements)"""
    import torch

    if bits == 8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _packed(elements, bits: int):
    if bits == 8:
        return elements.contiguous()
    pairs = elements.reshape(elements.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def slicing_table(
    table, names: list[str], concat: dict[str, list[str]], nbits: dict[str, dict] | None = None
) -> dict[str, Slicing]:
    """weight name -> how it splits, from the family's TENSOR_PARALLEL table (a quantized
    weight's blocks, scales and zero points split as the weight they stand for)."""
    from xcompile.passes.quantize_nbits import nbits_names

    nbits = nbits or {}
    derived = {}
    for weight, spec in nbits.items():
        for role, name in zip(("qweight", "scales", "zero_points"), nbits_names(weight)):
            derived[name] = (weight, role, (spec["bits"], spec["block_size"], spec["K"]))

    def kind(name: str) -> str:
        stem = name.removesuffix(".weight").removesuffix(".bias")
        bias = name.endswith(".bias")
        for k in ("column", "row", "vocab"):
            for entry in getattr(table, k):
                if stem == entry or stem.endswith("." + entry):
                    return "replicated" if (bias and k == "row") else k
        return "replicated"

    out = {}
    for name in names:
        source, role, spec = derived.get(name, (name, None, None))
        if source in concat:
            kinds = {kind(p) for p in concat[source]}
            if kinds != {"column"}:
                raise UserError(f"cannot shard {source}: its parts are not all column-parallel")
            out[name] = Slicing("column", tuple(concat[source]), role, spec, source)
        else:
            out[name] = Slicing(kind(source), (), role, spec, source)
    return out


def _const(graph: ir.Graph, name: str, value: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(value))
    graph.register_initializer(v)
    return v


def _insert_after(graph: ir.Graph, value: ir.Value, make: Callable[[ir.Value], list[ir.Node]]):
    """Route every use of `value` through the nodes `make` builds (their last output)."""
    uses = list(value.uses())
    nodes = make(value)
    graph.insert_after(value.producer(), nodes)
    new = nodes[-1].outputs[0]
    new.shape, new.type = value.shape, value.type
    for user, index in uses:
        user.replace_input_with(index, new)
    if value.is_graph_output():
        raise UserError("a row-parallel output is a graph output; cannot shard this graph")


def shard_graph(
    model: onnx.ModelProto,
    slicing: dict[str, Slicing],
    rank: int,
    ranks: int,
    weight_file: str,
    merge: bool = True,
) -> onnx.ModelProto:
    """Rank `rank`'s graph: head counts, split sizes, collectives; weights referenced (offsets to
    be filled by the caller) in `weight_file`."""
    m = ir.serde.deserialize_model(model)
    g = m.graph
    for node in list(g):
        if node.op_type == "GroupQueryAttention":
            for attr in ("num_heads", "kv_num_heads"):
                node.attributes[attr] = ir.AttrInt64(attr, node.attributes[attr].value // ranks)
        elif node.op_type == "RotaryEmbedding":
            n = node.attributes["num_heads"].value
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", n // ranks)
        elif (
            node.op_type == "Split"
            and node.inputs[1] is not None
            and node.inputs[1].const_value is not None
        ):
            sizes = node.inputs[1].const_value.numpy() // ranks
            node.replace_input_with(1, _const(g, f"{node.inputs[1].name}/rank{rank}", sizes))
        elif node.op_type in ("MatMul", "MatMulNBits"):
            if node.op_type == "MatMulNBits":
                w = slicing.get(node.inputs[1].name)
                if w is not None and w.kind in ("column", "vocab"):
                    n = node.attributes["N"].value
                    node.attributes["N"] = ir.AttrInt64("N", n // ranks)
                elif w is not None and w.kind == "row":
                    per_rank, block, _ = w.row_blocks(ranks)
                    node.attributes["K"] = ir.AttrInt64("K", per_rank)
                    node.attributes["block_size"] = ir.AttrInt64("block_size", block)
            else:
                found = weight_chain(node.inputs[1])
                if found is None:
                    continue
                w = slicing.get(found[0].name)
            out = node.outputs[0]
            if w is not None and w.kind == "row":
                _insert_after(
                    g,
                    out,
                    lambda v, n=node: [
                        ir.node(
                            "AllReduce",
                            [v],
                            domain=DOMAIN,
                            name=n.name.rsplit("/", 1)[0] + "/AllReduce",
                        )
                    ],
                )
            elif w is not None and w.kind == "vocab":
                users = list(out.uses())
                if len(users) == 1 and users[0][0].op_type == "Add":  # a split bias first
                    out = users[0][0].outputs[0]
                _insert_after(
                    g,
                    out,
                    lambda v, n=node: [
                        ir.node(
                            "AllGather",
                            [v],
                            attributes={"axis": -1},
                            domain=DOMAIN,
                            name=n.name.rsplit("/", 1)[0] + "/AllGather",
                        )
                    ],
                )
        elif node.op_type == "Gather" and node.inputs[0].is_initializer():
            w = slicing.get(node.inputs[0].name)
            if w is None or w.kind != "vocab":
                continue
            _vocab_parallel_gather(g, node, rank, ranks)
        elif node.op_type in ("GatherBlockQuantized", "GatherNBits"):  # passes/quantized_embedding
            scales = stored_scales(node.inputs[2])  # (N, k_blocks): its rows are the table's
            w = slicing.get(scales.name)
            if w is None or w.kind != "vocab":
                continue
            _vocab_parallel_gather(g, node, rank, ranks, int(scales.shape[0]))
    for name, value in list(g.initializers.items()):
        if name in slicing and value.const_value is not None:
            shape = slicing[name].shape(name, tuple(value.shape), ranks)
            value.const_value = ir.ExternalTensor(
                location=weight_file,
                offset=0,
                length=int(np.prod(shape) * value.dtype.itemsize),
                dtype=value.dtype,
                shape=ir.Shape(shape),
                name=name,
                base_dir="",
            )
            value.shape = ir.Shape(shape)
    m.opset_imports[DOMAIN] = 1
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from xcompile.passes.allreduce_merge import AllReduceMergePass

    if merge:
        AllReduceMergePass()(m)
    RemoveUnusedNodesPass()(m)
    return ir.serde.serialize_model(m)


def _vocab_parallel_gather(
    g: ir.Graph, gather: ir.Node, rank: int, ranks: int, vocab: int | None = None
) -> None:
    """rows = Gather(W_r, ids - offset) with ids outside [offset, offset + V/R) reading row 0 and
    then zeroed; the AllReduce after the (cast) rows sums the ranks' rows into the full lookup.
    A lookup on quantized blocks (GatherBlockQuantized, GatherNBits: ids their second input too)
    gives V, its table's rows, as `vocab`."""
    table, ids = gather.inputs[:2]
    rows = (vocab or table.shape[0]) // ranks
    scope = gather.name.rsplit("/", 1)[0]
    offset = _const(g, f"{scope}/vocab_offset/rank{rank}", np.array(rank * rows, dtype=np.int64))
    limit = _const(g, f"{scope}/vocab_rows", np.array(rows, dtype=np.int64))
    zero = _const(g, f"{scope}/vocab_zero", np.array(0, dtype=np.int64))
    local = ir.node("Sub", [ids, offset], name=f"{scope}/vocab/Sub")
    low = ir.node("GreaterOrEqual", [local.outputs[0], zero], name=f"{scope}/vocab/GreaterOrEqual")
    high = ir.node("Less", [local.outputs[0], limit], name=f"{scope}/vocab/Less")
    inside = ir.node("And", [low.outputs[0], high.outputs[0]], name=f"{scope}/vocab/And")
    safe = ir.node(
        "Where", [inside.outputs[0], local.outputs[0], zero], name=f"{scope}/vocab/Where"
    )
    g.insert_before(gather, [local, low, high, inside, safe])
    gather.replace_input_with(1, safe.outputs[0])
    out = gather.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and users[0][0].op_type == "Cast":  # a BF16 table: mask the cast rows
        out = users[0][0].outputs[0]
    axes = _const(g, f"{scope}/vocab_axes", np.array([-1], dtype=np.int64))

    def make(v: ir.Value) -> list[ir.Node]:
        keep = ir.node("Unsqueeze", [inside.outputs[0], axes], name=f"{scope}/vocab/Unsqueeze")
        as_float = ir.node(
            "Cast",
            [keep.outputs[0]],
            attributes={"to": ir.DataType.FLOAT},
            name=f"{scope}/vocab/Cast",
        )
        masked = ir.node("Mul", [v, as_float.outputs[0]], name=f"{scope}/vocab/Mul")
        reduce = ir.node("AllReduce", [masked.outputs[0]], domain=DOMAIN, name=f"{scope}/AllReduce")
        return [keep, as_float, masked, reduce]

    _insert_after(g, out, make)


def check_divisible(config: dict, ranks: int) -> None:
    for key, what in (
        ("heads", "attention heads"),
        ("kv_heads", "KV heads"),
        ("vocab", "vocabulary rows"),
    ):
        if config[key] % ranks:
            raise UserError(
                f"{config[key]} {what} do not split over {ranks} ranks; choose a "
                f"--ranks that divides {config[key]}"
            )


def concat_recipes(model: onnx.ModelProto) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """(concatenated weight -> its parts, -> rows of each part) from the graph's metadata."""
    meta = {p.key: p.value for p in model.metadata_props}
    return (
        json.loads(meta.get("xcompile.concat", "{}")),
        json.loads(meta.get("xcompile.concat_rows", "{}")),
    )
