"""The execution plan: a graph turned, once, into a flat list of bound steps.

    plan = build_plan(model, weights, use_kernels=True)
    logits = plan.run({"input_ids": ..., "position_ids": ..., "past_key_values.0.key": view, ...})

Building the plan does all the graph work a decode step should not: topological order, constant
folding (shapes, casts of small tensors), binding weights to the steps that use them, and these
rewrites:
  - MatMul(x, Transpose(Cast?(W))) with W a weight (N, K) -> one Linear step on W as stored
    (csrc GEMV for a few rows, a csrc or numpy GEMM for many; W is never transposed or copied);
  - Concat(past_key_values.i.*, new, axis=2) -> KV append: the new rows are written into the
    preallocated cache behind the past view and the step returns a view of the whole, no copy.
Running is one loop over the steps, on numpy arrays and the csrc kernels; `use_kernels=False`
runs every step on its torch reference instead (torch imported then: `xrun --reference`), on
torch views of the same weights and cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xcompile._C import Tape
from xcompile.errors import UserError
from xcompile.runtime import fused_ops, ops
from xcompile.runtime.arrays import (
    BF16,
    F32,
    aligned,
    f32,
    from_torch,
    ptr,
    round_bf16,
    to_torch,
    widen,
)
from xcompile.runtime.fallback_ops import FALLBACK
from xcompile.runtime.kv_cache import check_room
from xcompile.runtime.onnx_file import attribute_value, proto, to_array
from xcompile.runtime.replay import (
    DYNAMIC,
    NATIVE,
    PYTHON,
    Program,
    Start,
    address,
    addresses,
    emit,
    recording_step,
    work,
)

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
GEMV_MAX_ROWS = 8  # rows up to which the csrc GEMV beats numpy's GEMM (decode, small batches)
# Weights stored narrower than the activations (BF16, INT8, INT4) would be widened whole for
# a GEMM at every call; the GEMV reads them once for all rows, so it wins for longer:
# a 9-token BF16 prefill of the 1.1B model went from ~4 s to well under 1 s.
NARROW_GEMV_MAX_ROWS = 64


@dataclass
class Step:
    name: str
    fn: Callable[..., Any]
    ins: tuple[int, ...]  # value slots; -1 for an omitted optional input
    outs: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    view: bool = False  # its outputs are views of its inputs, nothing else (Split)


class Plan:
    def __init__(self, steps: list[Step], slots: list[Any], feeds: dict[str, int], fetch: int):
        self.steps = steps
        self.slots = slots  # constants filled in; the rest written by steps while running
        self.feeds = feeds
        self.fetch = fetch
        self._ready: dict[Any, Program] = {}  # key -> a program two recordings agreed on
        self._seen: dict[Any, Program] = {}  # key -> its latest recording, not yet confirmed
        self._tries: dict[Any, int] = {}  # key -> recordings that did not agree
        self._kept: dict[tuple[int, int], np.ndarray] = {}  # Python steps' outputs, kept put
        self.pool: fused_ops.BufferPool | None = None  # the steps' shared output blocks
        self.reference = False  # steps on torch (use_kernels=False): feeds and result converted

    profile: dict[str, float] | None = None  # op kind -> seconds, when profiling (XCOMPILE_PROFILE)
    # the rows of the output projection's input to compute (int64), None: all of them.
    # Prefill needs the logits of its last row only: the others would cost S x vocab x hidden.
    rows: np.ndarray | None = None
    replay = True  # replay recorded forwards (see runtime/replay.py)
    replayed = 0  # forwards replayed so far
    # forwards of more rows are run plainly, never recorded: a prefill's shape seldom comes back,
    # and recording costs
    MAX_REPLAY_ROWS = 16
    _MAX_PROGRAMS = 8  # keys kept ready (a server's batch changes composition often)
    _MAX_TRIES = 4  # recordings of one key that may disagree before it is given up
    _MAX_SEEN = 64  # keys recorded but not (yet) agreed on, kept: a server would keep all

    def run(
        self, feeds: dict[str, np.ndarray], key: Any = None, starts: list[int] = ()
    ) -> np.ndarray:
        """key: what fixes every address and shape of this forward (the segments' slots and
        lengths, the rows projected), None: run plainly. The first forwards of a key are
        recorded; once two recordings agree, later forwards with that key are replayed."""
        if self.reference:
            return self._run_reference(feeds)
        env = self.slots
        for name, slot in self.feeds.items():
            env[slot] = feeds[name]
        if self.profile is not None:
            return self._run_profiled(env)
        if key is None or not self.replay or key_rows(key) > self.MAX_REPLAY_ROWS:
            return self._run_from(env, 0)
        program = self._ready.get(key)
        if program is not None:
            if program.generation == fused_ops.buffers_generation():
                return self._replay(program, env, key, starts)
            del self._ready[key]  # a buffer grew since: addresses moved
        if self._tries.get(key, 0) >= self._MAX_TRIES:
            return self._run_from(env, 0)
        return self._record(env, key)

    def _run_reference(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        env = self.slots
        for name, slot in self.feeds.items():
            env[slot] = to_torch(feeds[name])
        rows, self.rows = self.rows, None if self.rows is None else torch.from_numpy(self.rows)
        try:
            with torch.inference_mode():
                return from_torch(self._run_from(env, 0))
        finally:
            self.rows = rows

    def _run_from(self, env: list, first: int) -> np.ndarray:
        for step in self.steps[first:] if first else self.steps:
            _store(
                env, step, step.fn(*[env[i] if i >= 0 else None for i in step.ins], **step.attrs)
            )
        return env[self.fetch]

    def _record(self, env: list, key: Any) -> np.ndarray:
        program = Program(feeds=tuple(ptr(env[slot]) for slot in self.feeds.values()))
        for index, step in enumerate(self.steps):
            with recording_step() as record:
                result = step.fn(*[env[i] if i >= 0 else None for i in step.ins], **step.attrs)
            _store(env, step, result)
            if step.view and not record.calls and not record.work:
                continue  # views of stable memory: nothing to redo
            if record.calls and not record.work:
                program.entries.extend(
                    (DYNAMIC if any(type(x) is Start for x in args) else NATIVE, fn, args)
                    for fn, args in record.calls
                )
            else:  # re-run at each replay, its outputs copied where the recording read them
                result = self._settle(env, index, step, result)
                program.entries.append((PYTHON, index, addresses(result)))
        # a shared block that grew while recording moved the addresses that steps before the
        # growth wrote to as well: such a recording ends at a newer generation than the one
        # before it, so it never agrees with it; the next one, with nothing growing, does
        program.generation = fused_ops.buffers_generation()
        self._tries[key] = self._tries.get(key, 0) + 1
        seen = self._seen.pop(key, None)
        if seen is not None and seen.generation == program.generation and seen.same_as(program):
            if len(self._ready) >= self._MAX_PROGRAMS:
                self._ready.pop(next(iter(self._ready)))
            program.compile()
            self._ready[key] = program
            self._tries.pop(key, None)
        else:
            # a server's batches keep making new keys, most never met again: keep the latest
            if len(self._seen) >= self._MAX_SEEN:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = program
        if len(self._tries) > self._MAX_SEEN:
            self._tries.pop(next(iter(self._tries)))
        return env[self.fetch]

    def _settle(self, env: list, index: int, step: Step, result: Any) -> Any:
        """A Python step's outputs, copied into arrays kept for it (numpy allocates afresh at
        every call; the recorded kernel calls read the recording's addresses), and set in env."""
        values = result if len(step.outs) > 1 else (result,)
        settled = []
        for k, (slot, value) in enumerate(zip(step.outs, values)):
            if type(value) is np.ndarray and slot >= 0:
                kept = self._kept.get((index, k))
                if kept is None or kept.shape != value.shape or kept.dtype != value.dtype:
                    kept = self._kept[(index, k)] = aligned(value.shape, value.dtype)
                    fused_ops.bump_generation()
                if address(kept) != address(value) or kept.strides != value.strides:
                    np.copyto(kept, value)
                value = kept
            if slot >= 0:
                env[slot] = value
            settled.append(value)
        return tuple(settled) if len(step.outs) > 1 else settled[0]

    def _replay(self, program: Program, env: list, key: Any, starts: list[int]) -> np.ndarray:
        if tuple(ptr(env[slot]) for slot in self.feeds.values()) != program.feeds:
            del self._ready[key]
            return self._record(env, key)
        self.replayed += 1
        steps = self.steps
        for run in program.runs:
            if type(run) is Tape:
                run.run(starts)
                continue
            kind, a, b = run
            if kind == NATIVE:
                a(*b)
                continue
            if kind == DYNAMIC:
                a(*[starts[x.index] if type(x) is Start else x for x in b])
                continue
            step = steps[a]
            result = step.fn(*[env[i] if i >= 0 else None for i in step.ins], **step.attrs)
            result = self._settle(env, a, step, result)
            if addresses(result) != b:  # an output moved: finish this forward plainly
                del self._ready[key]
                return self._run_from(env, a + 1)
        return env[self.fetch]

    def _run_profiled(self, env: list) -> np.ndarray:
        import time

        for step in self.steps:
            t0 = time.perf_counter()
            result = step.fn(*[env[i] if i >= 0 else None for i in step.ins], **step.attrs)
            kind = step.name.rsplit("/", 1)[-1].split("_")[0]
            self.profile[kind] = self.profile.get(kind, 0.0) + time.perf_counter() - t0
            _store(env, step, result)
        return env[self.fetch]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for step in self.steps:
            kind = step.name.rsplit("/", 1)[-1].split("_")[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def key_rows(key: Any) -> int:
    """Rows of input_ids in a forward of this key: ((slot, length), ...), rows."""
    return sum(length for _, length in key[0])


def _store(env: list, step: Step, result: Any) -> None:
    """A step's result into its output slots."""
    if len(step.outs) == 1:
        env[step.outs[0]] = result
    else:
        for slot, value in zip(step.outs, result):
            if slot >= 0:  # an omitted optional output has no slot
                env[slot] = value


def _attrs(node) -> dict[str, Any]:
    return {a.name: attribute_value(a) for a in node.attribute}


def linear_step(weight: np.ndarray, use_kernels: bool) -> Callable[[np.ndarray], np.ndarray]:
    """x (..., K) @ weight (N, K)ᵀ -> (..., N) fp32; weight fp32 or bf16 as stored.

    Few rows (decode): the csrc GEMV, called directly on pointers resolved here, writing into a
    buffer kept per input shape (see fused_ops). Many rows (prefill): from avx512_bf16 on
    (vdpbf16ps, AMX), BF16 weights stay on the kernel call, which takes its prompt GEMM from 8
    (AMX: 16) rows on; below it, numpy's GEMM on BF16 weights widened a panel at a time
    (fused_ops.paneled_linear), and on FP32 weights as they are. use_kernels=False: torch's
    linear on a torch view of the weight (the reference)."""
    if not use_kernels:

        def reference(x):
            import torch

            return torch.nn.functional.linear(x, weight.to(x.dtype))

        return reference

    from xcompile import _C
    from xcompile.runtime import kernels

    n, k = weight.shape
    gemv = {F32: _C.gemv_f32, BF16: _C.gemv_bf16}.get(weight.dtype)
    w = ptr(weight)
    buffer = fused_ops.OutputBuffers()
    max_rows = GEMV_MAX_ROWS if weight.dtype == F32 else NARROW_GEMV_MAX_ROWS
    # prompts too go to the kernel call, which hands them to its GEMM (vdpbf16ps or AMX tiles)
    prompts = weight.dtype == BF16 and kernels.isa_at_least("avx512_bf16")

    def widen_panel(n0: int, n1: int, panel: np.ndarray) -> None:
        panel[...] = widen(weight[n0:n1])

    def run(x: np.ndarray) -> np.ndarray:
        rows = x.size // k
        if gemv is not None and (rows <= max_rows or prompts):
            x = f32(x)
            out = buffer((*x.shape[:-1], n))
            emit(gemv, ptr(x), w, 0, ptr(out), rows, n, k)
            return out
        if weight.dtype == BF16:
            return fused_ops.paneled_linear(f32(x), n, widen_panel, buffer)
        work()
        x = f32(x)
        out = buffer((*x.shape[:-1], n))
        np.matmul(x.reshape(rows, k), weight.T.astype(F32, copy=False), out=out.reshape(rows, n))
        return out

    return fused_ops.owns_outputs(run, buffer)


def split_fixed(x, *, sizes: list[int], axis: int) -> tuple:
    """Views of x's consecutive pieces of `sizes` along axis (numpy, or torch in the reference
    plan)."""
    if not isinstance(x, np.ndarray):
        return x.split(sizes, axis)
    head = (slice(None),) * (axis % x.ndim)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(x[(*head, slice(start, start + size))])
        start += size
    return tuple(pieces)


def kv_append(past, new, cache):
    """past (B,kv,P,d) is a view of cache (B,kv,capacity,d); write new (B,kv,S,d) at P..P+S and
    return the view (B,kv,P+S,d): widened to fp32 (a copy) when the cache is bf16, since the
    primitive graph's ops compute in fp32. numpy arrays, or torch tensors in the reference plan."""
    p, s = past.shape[2], new.shape[2]
    check_room(p + s, cache.shape[2])
    if isinstance(cache, np.ndarray):
        work()
        bf16 = cache.dtype == BF16
        cache[:, :, p : p + s] = round_bf16(new) if bf16 else new
        return widen(cache[:, :, : p + s]) if bf16 else cache[:, :, : p + s]
    cache[:, :, p : p + s] = new
    return cache[:, :, : p + s].to(new.dtype)


def build_plan(
    model: Any,
    weights: dict[str, np.ndarray],
    cache: dict[str, np.ndarray],
    use_kernels: bool = True,
    fetch: str = "logits",
    comm=None,
    kv=None,
) -> Plan:
    """cache: past input name (past_key_values.{i}.key|value) -> its preallocated buffer;
    comm: the Communicator the ai.xcompile collectives (AllReduce, AllGather) run on;
    kv: the KVCache those buffers belong to, whose `segments` say, at each run, which sequences
    the rows of input_ids belong to (the GroupQueryAttention steps read them: batching, beams).
    use_kernels=False: the reference plan, every step on torch (imported now) over torch views of
    the weights and cache."""
    graph = model.graph
    reference = not use_kernels
    held = to_torch if reference else (lambda a: a)  # what the steps hold: numpy or torch views
    if reference:
        cache = {name: to_torch(buffer) for name, buffer in cache.items()}
    slot: dict[str, int] = {}
    slots: list[Any] = []
    const: set[str] = set()

    def index(name: str) -> int:
        if name == "":
            return -1
        if name not in slot:
            slot[name] = len(slots)
            slots.append(None)
        return slot[name]

    for init in graph.initializer:
        if init.data_location == proto().TensorProto.EXTERNAL:
            t = weights.get(init.name)
            if t is None:
                raise UserError(
                    f"weights lack tensor {init.name!r} that the graph uses; rebuild the artifacts"
                )
            expected = ops.DTYPES.get(init.data_type)
            if tuple(t.shape) != tuple(init.dims) or t.dtype != expected:
                raise UserError(
                    f"weight {init.name!r} is {t.dtype} {tuple(t.shape)}, graph "
                    f"expects {expected} {tuple(init.dims)}; rebuild"
                )
        else:
            t = to_array(init)
        slots[index(init.name)] = held(t)
        const.add(init.name)

    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    def weight_chain(name: str) -> tuple[str, list] | None:
        """MatMul's B operand -> (weight name, [Transpose, Cast?]) when it is W(N,K)ᵀ."""
        node = producer.get(name)
        if node is None or node.op_type != "Transpose" or _attrs(node).get("perm") != [1, 0]:
            return None
        chain = [node]
        src = node.input[0]
        if src in producer and producer[src].op_type == "Cast" and _attrs(producer[src])["to"] == 1:
            chain.append(producer[src])
            src = producer[src].input[0]
        if src not in const or src in producer:
            return None
        return src, chain

    absorbed: set[str] = set()  # node names whose work a Linear step took over
    linears: dict[str, str] = {}  # MatMul node name -> weight name
    for node in graph.node:
        if node.op_type == "MatMul":
            found = weight_chain(node.input[1])
            if found:
                linears[node.name] = found[0]
                for n in found[1]:
                    if all(consumers.get(o, 0) <= 1 for o in n.output):
                        absorbed.add(n.name)

    # fp16 block scales and float zero points (passes/quantize_nbits.py): MatMulNBits takes them
    # in A's type, so the graph widens them with a Cast; the kernels read fp16 themselves, so the
    # Cast is not folded into an fp32 copy (twice the bytes each decode step reads)
    ms = "com.microsoft"
    scale_inputs = {
        (ms, "MatMulNBits"),
        (ms, "GatherBlockQuantized"),
        ("ai.xcompile", "GatherNBits"),
    }
    scale_uses: dict[str, list[bool]] = {}  # value -> per use: scales or zero points or not
    for node in graph.node:
        takes = (node.domain, node.op_type) in scale_inputs
        for i, name in enumerate(node.input):
            scale_uses.setdefault(name, []).append(takes and i in (2, 3))

    def half_floats(node) -> bool:
        return (
            node.op_type == "Cast"
            and node.domain in ("", "ai.onnx")
            and _attrs(node).get("to") == 1
            and node.input[0] in const
            and node.input[0] not in producer
            and getattr(slots[slot[node.input[0]]], "dtype", None) == np.float16
            and all(scale_uses.get(node.output[0], [False]))
        )

    def op_fn(node):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        key = (domain, node.op_type)
        if reference:
            from xcompile.runtime import reference_ops

            fused, standard = reference_ops.REFERENCE, reference_ops.OPS
        else:
            fast = fused_ops.fast_op(key)
            if fast is not None:
                return fast
            fused, standard = FALLBACK, ops.OPS
        if key in fused:
            return fused[key]
        if domain == "" and node.op_type in standard:
            return standard[node.op_type]
        raise UserError(
            f"the graph uses op {node.domain or 'ai.onnx'}.{node.op_type} "
            f"({node.name}), which this runtime does not run; rebuild the artifacts "
            "with this xcompile version"
        )

    steps: list[Step] = []
    for node in graph.node:
        if node.name in absorbed:
            continue
        attrs = _attrs(node)
        ins = tuple(index(n) for n in node.input)
        outs = tuple(index(n) for n in node.output)
        if node.name in linears:
            w = slots[slot[linears[node.name]]]
            steps.append(Step(node.name, linear_step(w, use_kernels), ins[:1], outs))
            continue
        if node.op_type == "Concat" and PAST.match(node.input[0]) and attrs.get("axis") == 2:
            buf = cache[node.input[0]]
            steps.append(Step(node.name + "/kv_append", kv_append, ins, outs, {"cache": buf}))
            continue
        if (
            node.op_type == "GroupQueryAttention"
            and len(node.input) > 4
            and PAST.match(node.input[3])
            and PAST.match(node.input[4])
        ):
            fn = fused_ops.attention_step(
                cache[node.input[3]], cache[node.input[4]], use_kernels, kv=kv
            )
            # seqlens_k and total_sequence_length follow from the cache views: not wired, so the
            # little graph that computes them per layer is dropped as dead code below
            steps.append(Step(node.name, fn, ins[:5], outs, attrs))
            continue
        if node.domain == "ai.xcompile" and node.op_type in ("AllReduce", "AllGather"):
            if comm is None:
                raise UserError(f"{node.name} needs ranks to talk to; run the artifacts with xrun")
            # numpy arrays, or the reference plan's torch tensors: the Communicator takes either
            fn = comm.all_reduce if node.op_type == "AllReduce" else comm.all_gather
            steps.append(Step(node.name, fn, ins, outs, attrs))
            continue
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            slots[outs[0]] = held(to_array(attrs["value"]))
            const.add(node.output[0])
            continue
        if (
            node.op_type == "Split"
            and node.domain in ("", "ai.onnx")
            and len(node.input) > 1
            and node.input[1] in const
            and node.input[0] not in const
        ):  # split sizes known now: no tensor-to-list conversion per call
            sizes = [int(n) for n in slots[slot[node.input[1]]].tolist()]
            axis = int(attrs.get("axis", 0))
            attrs = {"sizes": sizes, "axis": axis}
            steps.append(Step(f"{node.name}/Split", split_fixed, ins[:1], outs, attrs, view=True))
            continue
        if half_floats(node):  # the consumers read the fp16 as stored
            slots[outs[0]] = slots[slot[node.input[0]]]
            const.add(node.output[0])
            continue
        fn = op_fn(node)
        if all(n in const or n == "" for n in node.input):  # fold now, once
            result = fn(*[slots[slot[n]] if n else None for n in node.input], **attrs)
            results = result if len(node.output) > 1 else (result,)
            for name, value in zip(node.output, results):
                slots[index(name)] = value
                const.add(name)
            continue
        steps.append(
            Step(
                node.name if "/" in node.name else f"{node.name}/{node.op_type}",
                fn,
                ins,
                outs,
                attrs,
            )
        )

    # keep only the steps the fetched output needs
    if fetch not in slot:
        raise UserError(f"the graph has no output {fetch!r}; rebuild the artifacts")
    head = _head_step(steps, producer, fetch)
    needed = {slot[fetch]}
    kept = []
    for step in reversed(steps):
        if any(o in needed for o in step.outs):
            kept.append(step)
            needed.update(i for i in step.ins if i >= 0)
    kept.reverse()
    feeds = {i.name: slot[i.name] for i in graph.input if i.name in slot and slot[i.name] in needed}
    plan = Plan(kept, slots, feeds, slot[fetch])
    plan.reference = reference
    if head is not None:  # the output projection sees only the rows asked for (Plan.rows)
        inner = head.fn

        def project(x, *args, **kwargs):
            if plan.rows is not None:
                work()  # a gather of rows: numpy's, redone at each replay
                x = x[:, plan.rows]
            return inner(x, *args, **kwargs)

        project.__dict__.update(inner.__dict__)  # its buffers, and whether its outputs are fresh
        head.fn = project
    plan.pool = share_buffers(kept, slot[fetch])
    return plan


def share_buffers(steps: list[Step], fetch: int) -> fused_ops.BufferPool:
    """Map the steps' output buffers onto one pool, so that steps whose outputs are never alive
    at the same time use the same blocks (the plan's memory then follows the largest set of
    values alive at once, a few per layer, instead of every intermediate of every layer).

    A value's memory belongs to the step that owns its buffers. A step that may return views of
    its inputs (Split, Reshape, any reference op, attention's general path) passes its inputs'
    owners on to its outputs, so a block stays alive until the last reader of any view of it.
    Steps i < j may share a block only if every read of i's memory happens before step j, so no
    step ever writes into a block it is reading. The fetched output keeps a block of its own, so
    it stays as it was until the next run reaches its step (as it did with a block per step)."""
    owners: dict[int, set[int]] = {}  # value slot -> steps whose blocks it may live in
    last: dict[int, int] = {}  # owning step -> the last step that reads its memory
    for i, step in enumerate(steps):
        read: set[int] = set()
        for s in step.ins:
            read |= owners.get(s, set())
        for o in read:
            last[o] = i
        mine = {i} if getattr(step.fn, "buffers", None) is not None else set()
        passed = mine if getattr(step.fn, "fresh_outputs", False) else mine | read
        for s in step.outs:
            if s >= 0:
                owners[s] = passed
    result = owners.get(fetch, set())
    pool = fused_ops.BufferPool()
    free_after: list[int] = []  # color -> the last step reading the block's current owner
    for i, step in enumerate(steps):
        buffers = getattr(step.fn, "buffers", None)
        if buffers is None:
            continue
        color = next((c for c, end in enumerate(free_after) if end < i), len(free_after))
        if i in result:  # a block of its own: the caller reads it until the next run's step
            color = len(free_after)
        if color == len(free_after):
            free_after.append(0)
        free_after[color] = len(steps) if i in result else last.get(i, i)
        buffers.share(pool, color)
    return pool


def _head_step(steps: list[Step], producer: dict, fetch: str) -> Step | None:
    """The step of the output projection (lm_head): the first node before `fetch` that is not
    an Identity, a gather of its shards, its bias or a scaling (all row-wise)."""
    node = producer.get(fetch)
    while node is not None and node.op_type in ("Identity", "AllGather", "Add", "Div"):
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
        return None
    names = (node.name, f"{node.name}/{node.op_type}")
    return next((s for s in steps if s.name in names), None)
