"""GPTQ and AWQ, decoder layer by decoder layer: neural-compressor's algorithms run on one
transformers decoder layer at a time, built from that layer's own tensors and fed the
calibration text's hidden states as the layer before left them.

    lines ──tokenizer.json──► ids ──embedding rows──► X₀: one (1, S, H) tensor per line
    for layer i:  build it (its FP32 tensors only) ─► INC's GPTQ or AWQ ─► LayerResult ─► free it
                  X_{i+1} = layer_i(X_i)   GPTQ: with the quantized weights; AWQ: the FP32 ones
                                           (each as INC's own driver carries them)

Peak memory: one layer's FP32 weights plus the hidden states (lines × tokens × hidden × 4 bytes;
64 lines of 128 tokens at hidden 2048 is 64 MiB). Nothing else of the model is ever resident: the
embedding rows are read one by one, for the token ids the text uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from xcompile.errors import UserError
from xcompile.frontend.checkpoint import Checkpoint
from xcompile.frontend.decoder import DecoderSpec
from xcompile.quiet import quiet_imports
from xcompile.weight_only import WeightOnly

DEFAULT_TEXT = Path(__file__).parent / "data" / "calib.txt"
MAX_TOKENS = 128  # per row of the batch (and per line: longer lines are cut)
MAX_LINES = 1024
MAX_ROWS = 64  # GPTQ: 8192 tokens at most, the Hessians settle well before
# AWQ runs the layer 21 times per scale group and each linear 21 times (its grid of 20 scales):
# 256 tokens hold its activation statistics (SmolLM2 g128: PPL 16.10, 15.95 on 512 tokens,
# RTN 16.96) and keep a 135M model under a minute, a 1.1B one under 8
AWQ_ROWS = 2
GPTQ_PERCDAMP = 0.01  # INC's default (GPTQConfig)
# columns per lazy batch (GPTQ's own 128, not GPTQConfig's 2048): the same result, but within a
# batch every column updates all the batch's later ones, N x batch floats each; at 2048 that
# traffic made a 4-layer, hidden-1024 model take 12 minutes
GPTQ_BLOCK = 128

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # as weight_only.quantize_rtn


@dataclass
class LayerResult:
    """What one decoder layer's calibrated quantization made, by checkpoint tensor name.

    quantized  weight -> (q (N, K), scales (N, groups) f32, zero points (N, groups) or None)
               with quantize_rtn's levels: symmetric q int8 signed, asymmetric q uint8 in
               [0, 2^bits) and zero points uint8 (float offsets: float32)
    changed    float tensors the algorithm rewrote (AWQ: the norms' weights and biases, an
               absorbing linear's bias), to store instead of the checkpoint's
    folded     AWQ: weight -> (column multipliers (K,) or None, row divisors (N,) or None): the
               stored weight is diag(1/rows) · W · diag(cols), its input arriving divided by
               cols (what the absorbing norm or linear now does) and its output by rows
    weights    every linear's float weight as the algorithm leaves it for a weight the plan
               stores in another layout (AWQ: scaled like the quantized ones, its absorber having
               changed; GPTQ: as in the checkpoint)
    """

    index: int
    quantized: dict[str, Quantized] = field(default_factory=dict)
    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def calibration_lines(path: Path | None) -> list[str]:
    """The non-blank lines of `path` (None: the shipped text: prose and code), at most
    MAX_LINES, indentation kept."""
    text = Path(path or DEFAULT_TEXT).read_text(encoding="utf-8", errors="replace")
    return [line.rstrip() for line in text.splitlines() if line.strip()][:MAX_LINES]


def tokenize(ckpt: Checkpoint, lines: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Each line and its newline by the checkpoint's own tokenizer.json (specials included)
    -> (1, S) int64."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    out = [torch.tensor([tok.encode(line + "\n").ids[:max_tokens]]) for line in lines]
    return [ids for ids in out if ids.shape[1]]


def batched(samples: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """The samples' tokens run together and cut into rows of `length` -> [(rows, length)]: one
    batch, so that each layer's calibration pass is a few large matmuls instead of a Python
    loop of small ones (GPTQ's and AWQ's own drivers cut their text into windows likewise).
    The tail that fills no row is dropped, unless no row fills: then it is the one row."""
    ids = (
        torch.cat([s.reshape(-1) for s in samples]) if samples else torch.empty(0, dtype=torch.long)
    )
    rows = min(ids.numel() // length, MAX_ROWS)
    if rows == 0:
        return [ids.view(1, -1)] if ids.numel() else []
    return [ids[: rows * length].view(rows, length)]


class LayerByLayer:
    """One checkpoint's decoder, one transformers layer at a time: the family's own layer and
    rotary classes (found on a weightless meta-device skeleton), weights read on demand."""

    def __init__(self, ckpt: Checkpoint, spec: DecoderSpec):
        with quiet_imports():
            from transformers import AutoModelForCausalLM

        from xcompile.quantize import read_tensor

        self.ckpt, self.spec, self._read = ckpt, spec, read_tensor
        config = ckpt.transformers_config()
        config._attn_implementation = "eager"  # the additive mask below, as given
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        base = skeleton.base_model
        stack = next(m for m in base.children() if isinstance(m, nn.ModuleList))
        self.config, self.layer_class = config, type(stack[0])
        self.rotary = type(base.rotary_emb)(config=config)  # on the CPU: real tables
        self._handles: dict[Path, object] = {}

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def tensor(self, name: str) -> torch.Tensor:
        path, info = self.ckpt.tensors[name]
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        return self._read(path, info, self._handles[path]).float()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, H) float32, reading only the table's rows those ids name."""
        from xcompile.artifacts import DTYPES, TensorInfo

        path, info = self.ckpt.tensors[self.spec.names.embed]
        rows, hidden = info.shape
        if int(ids.max()) >= rows:
            raise UserError(
                f"{self.ckpt.path}: tokenizer.json makes token id {int(ids.max())} but the "
                f"embedding has {rows} rows; fix the tokenizer or the checkpoint"
            )
        start, row = info.begin, hidden * DTYPES[info.dtype][0]
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        table = {
            i: self._read(
                path,
                TensorInfo(
                    info.name, info.dtype, (hidden,), start + i * row, start + (i + 1) * row
                ),
                self._handles[path],
            ).float()
            for i in set(ids.reshape(-1).tolist())
        }
        rows = torch.stack([table[i] for i in ids.reshape(-1).tolist()])
        return rows.view(*ids.shape, hidden) * self.spec.embed_scale  # Granite's multiplier

    def layer(self, i: int) -> nn.Module:
        """Decoder layer i in FP32 with its checkpoint tensors (and nothing else) loaded."""
        prefix = self.spec.names.layer.format(i=i)
        with torch.device("meta"):
            layer = self.layer_class(self.config, layer_idx=i)
        params = {n for n, _ in layer.named_parameters()}
        state = {
            name[len(prefix) :]: self.tensor(name)
            for name in self.ckpt.tensors
            if name.startswith(prefix) and name[len(prefix) :] in params
        }
        if params - state.keys():
            raise UserError(
                f"{self.ckpt.path}: checkpoint lacks {prefix}{sorted(params - state.keys())[0]} "
                f"that a {self.spec.family} layer needs; is it complete?"
            )
        layer.load_state_dict(state, assign=True)
        if any(b.is_meta for b in layer.buffers()):  # a table the layer computes for itself
            raise NotImplementedError(f"{self.layer_class.__name__} has buffers of its own")
        return layer.float().eval()

    def layer_kwargs(self, ids: torch.Tensor, i: int, x: torch.Tensor) -> dict:
        """What transformers' model hands layer i for one sequence: positions, rotary tables
        and the additive causal mask (1, 1, S, S), with the layer's sliding window if any."""
        s = ids.shape[1]
        pos = torch.arange(s).unsqueeze(0)
        q, k = pos[0].view(-1, 1), pos[0].view(1, -1)
        allowed = k <= q
        window = self.spec.sliding_window[i] if self.spec.sliding_window else None
        if window is not None:
            allowed &= k > q - window
        mask = torch.zeros(s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)
        # Gemma 3's rotary keeps a set of tables per layer type and is asked for the layer's
        per_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        kind = {"layer_type": self.config.layer_types[i]} if per_type else {}
        return {
            "attention_mask": mask.view(1, 1, s, s),
            "position_ids": pos,
            "position_embeddings": self.rotary(x, pos, **kind),
            "use_cache": False,
        }


def quantize_layers(
    ckpt: Checkpoint,
    spec: DecoderSpec,
    scheme: WeightOnly,
    lines: list[str] | None = None,
    max_tokens: int = MAX_TOKENS,
) -> Iterator[LayerResult]:
    """GPTQ or AWQ (scheme.algo) over the decoder, one LayerResult per layer, in order.
    lines: the calibration text (None: scheme.calib's file, or the shipped one)."""
    if scheme.algo not in ("gptq", "awq"):
        raise ValueError(f"calibrated quantization is gptq or awq, not {scheme.algo}")
    lines = calibration_lines(scheme.calib) if lines is None else lines
    decoder = LayerByLayer(ckpt, spec)
    try:
        length = min(max_tokens, spec.max_positions)
        samples = batched(tokenize(ckpt, lines, length), length)
        if scheme.algo == "awq":
            samples = [rows[:AWQ_ROWS] for rows in samples]
        if not samples:
            raise UserError("the calibration text has no tokens; give at least one line of text")
        with torch.no_grad():
            hidden = [decoder.embed(ids) for ids in samples]
        run = _gptq_layer if scheme.algo == "gptq" else _awq_layer
        for i in range(spec.layers):
            layer = decoder.layer(i)
            inputs = [(x, decoder.layer_kwargs(ids, i, x)) for ids, x in zip(samples, hidden)]
            result, hidden = run(layer, inputs, scheme, spec, i)
            as_parts(result, spec, i, ckpt)
            del layer, inputs
            _return_freed_memory()
            yield result
            del result
    finally:
        decoder.close()


def _return_freed_memory() -> None:
    """A layer's objects can sit in reference cycles (INC's AWQ object and the hook we give it
    hold each other, and through it the layer's FP32 weights) that Python's collector, counting
    objects rather than bytes, frees only now and then: the 1.1B model's AWQ crept from 1.2 to
    2.7 GB. Collect them after each layer. Then glibc keeps the freed pages in its arenas, where
    the next layer's differently sized tensors fragment them: trimming returns them."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _quiet_inc():
    with quiet_imports():
        import transformers  # noqa: F401  before INC, whose gptq module checks for it on import
        from neural_compressor.torch.algorithms.weight_only import awq, gptq, utility
    return awq, gptq, utility


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _forward(layer: nn.Module, inputs) -> list[torch.Tensor]:
    outs = [layer(x, **kw) for x, kw in inputs]
    return [o[0] if isinstance(o, tuple) else o for o in outs]


@torch.no_grad()
def _gptq_layer(layer, inputs, scheme: WeightOnly, spec: DecoderSpec, i: int):
    """INC's GPTQ core on every linear of the layer at once (INC's default, not true-sequential):
    Hessians from the layer's FP32 pass, then `fasterquant`; outputs with the quantized weights."""
    _, gptq, utility = _quiet_inc()
    prefix = spec.names.layer.format(i=i)
    config = {  # INC's GPTQConfig defaults, as gptq_entry hands them to the quantizer
        "dtype": "int",
        "bits": scheme.bits,
        "sym": scheme.sym,
        "group_size": scheme.group_size,
        "perchannel": True,
        "mse": False,
        "use_double_quant": False,
        "double_quant_dtype": "int",
        "double_quant_bits": 8,
        "double_quant_sym": False,
        "double_quant_group_size": 256,
    }
    linears = _linears(layer)
    cores = {}
    for name, m in linears.items():
        cores[name] = gptq.GPTQ(m, m.weight.data, "cpu")
        cores[name].quantizer.configure(dict(config))
        if scheme.search or scheme.float_zero_points:
            _searched_grid(cores[name].quantizer, scheme)
    hooks = [
        m.register_forward_hook(lambda _, inp, out, core=cores[name]: core.add_batch(inp[0], out))
        for name, m in linears.items()
    ]
    try:
        _forward(layer, inputs)
    finally:
        for h in hooks:
            h.remove()
    result = LayerResult(i)
    for name, m in linears.items():
        result.weights[f"{prefix}{name}.weight"] = m.weight.data  # rebound to dq below
        scale, _, zero, dq = cores.pop(name).fasterquant(
            m.weight.data.clone(),
            blocksize=GPTQ_BLOCK,
            percdamp=GPTQ_PERCDAMP,
            groupsize=scheme.group_size,
        )
        m.weight.data = dq
        zp = None if scheme.sym else zero
        # the integer levels, by INC's own export step (symmetric: zero point left out, signed)
        q = utility.quant_weight_w_scale(dq.clone(), scale, None, zp, scheme.group_size)
        result.quantized[f"{prefix}{name}.weight"] = _narrow(q, scale, zp, scheme)
    return result, _forward(layer, inputs)


def _searched_grid(quantizer, scheme: WeightOnly) -> None:
    """GPTQ's quantizer with our blocks: each group's scale (and float offset) by
    rtn_search.py's fit, taken as GPTQ reaches the group (as GPTQ takes its min/max), and the
    rounding on that grid. INC's own grid has integer zero points and the extremes' scale."""
    from xcompile.rtn_search import quantize_searched

    layout = scheme.layout
    half = float(1 << (layout.bits - 1))

    def find_params(x, weight=False):  # x (N, group): this group's columns as GPTQ left them
        _, scale, zero = quantize_searched(x, layout.bits, -1, layout.zero_points, scheme.search)
        quantizer.scale = scale.reshape(-1, 1)
        quantizer.zero = (torch.full_like(scale, half) if zero is None else zero).reshape(-1, 1)

    def quantize(x, scale, zero, maxq):
        return scale * (torch.clamp(torch.round(x / scale + zero), 0, maxq) - zero)

    quantizer.find_params, quantizer.quantize = find_params, quantize


def _narrow(q, scales, zp, scheme: WeightOnly) -> Quantized:
    """INC's integers come as float32: a byte each instead (a quarter of the layer's size).
    Float offsets stay float."""
    levels = torch.int8 if scheme.sym else torch.uint8
    if zp is not None:
        zp = zp.float() if scheme.float_zero_points else zp.round().to(torch.uint8)
    return q.round().to(levels), scales.float(), zp


def as_parts(result: LayerResult, spec: DecoderSpec, i: int, ckpt: Checkpoint) -> None:
    """A linear the checkpoint stores fused (Phi-3's qkv_proj, gate_up_proj) comes back from the
    layer under its own name; the graph quantizes its row views (q/k/v, gate/up): split the
    integers, scales, zero points and weights by those rows (exact: groups run along rows).
    AWQ's column multipliers are the fused input's, the same for every part."""
    prefix = spec.names.layer.format(i=i)
    for fused, parts in spec.names.fused:
        name = f"{prefix}{fused}.weight"
        names = [f"{prefix}{p}.weight" for p in parts]
        rows = [ckpt.tensors[p][1].shape[0] for p in names]
        if name in result.quantized:
            pieces = [
                t.split(rows) if t is not None else [None] * len(rows)
                for t in result.quantized.pop(name)
            ]
            result.quantized.update(zip(names, zip(*pieces)))
        if name in result.weights:
            result.weights.update(zip(names, result.weights.pop(name).split(rows)))
        if name in result.folded:
            cols, divisors = result.folded.pop(name)
            assert divisors is None, f"{fused} absorbed a scale: its parts cannot"
            result.folded.update((p, (cols, None)) for p in names)


def absorbers(spec: DecoderSpec) -> dict[str, tuple[str, ...]]:
    """Where AWQ may fold a linear's input-channel scale, in the layer's own module names:
    into the norm before it (INC's own finding for these layers), and (as AWQ's authors do)
    into v_proj's rows for o_proj when no query heads share a KV head, and into up_proj's rows
    for down_proj behind a gated MLP (act(gate) · up is linear in up). A linear the checkpoint
    fuses (Phi-3's qkv_proj, gate_up_proj) is the module; its parts absorb nothing."""
    n = spec.names
    module = {part: fused for fused, parts in n.fused for part in parts}

    def modules(*names: str | None) -> tuple[str, ...]:
        return tuple(dict.fromkeys(module.get(p, p) for p in names if p))

    found = {}
    if n.mlp_norm is None:  # parallel residual: one norm feeds attention and MLP
        found[n.attn_norm] = modules(n.q, n.k, n.v, n.gate, n.up)
    else:
        found[n.attn_norm] = modules(n.q, n.k, n.v)
        found[n.mlp_norm] = modules(n.gate, n.up)
    if spec.heads == spec.kv_heads and n.v not in module:
        found[n.v] = (n.o,)
    if n.gate and n.up not in module:
        found[n.up] = (n.down,)
    return found


@contextlib.contextmanager
def _searches_at_our_bits(utility):
    """INC 3.10's AWQ scale and clip searches call quant_tensor(num_bits=, data_type=), names it
    does not take (it takes bits=, dtype=) and drops, so every search ran at its default 4 bits
    (at --int8, clip ratios fit for 4 bits made the error 5x RTN's): pass them on as meant."""
    original = utility.quant_tensor

    def quant_tensor(weight, *args, num_bits=None, data_type=None, **kwargs):
        if num_bits is not None:
            kwargs.setdefault("bits", num_bits)
        if data_type is not None:
            kwargs.setdefault("dtype", data_type)
        return original(weight, *args, **kwargs)

    utility.quant_tensor = quant_tensor  # awq.py imports it from the module at each call
    try:
        yield
    finally:
        utility.quant_tensor = original


@torch.no_grad()
def _awq_layer(layer, inputs, scheme: WeightOnly, spec: DecoderSpec, i: int):
    """INC's ActAwareWeightQuant on a one-layer model: scale search, folding into the
    absorbers, clip search; then each weight by INC's RTN at its clip ratio (what INC's last
    step does, here returning the integers instead of INC's packed module). With our blocks
    (searched scales or float offsets) the last step is our RTN, whose fit replaces INC's clip
    search."""
    awq, _, utility = _quiet_inc()
    prefix = spec.names.layer.format(i=i)
    holder = nn.Module()
    holder.layers = nn.ModuleList([layer])  # INC finds the block list as the first ModuleList
    absorb = absorbers(spec)
    algo = awq.ActAwareWeightQuant(
        holder,
        example_inputs=inputs[0][0],
        data_type="int",
        bits=scheme.bits,
        group_size=scheme.group_size,
        scheme="sym" if scheme.sym else "asym",
        weight_config={},
        total_block_args=[[x] for x, _ in inputs],
        total_block_kwargs=[dict(kw) for _, kw in inputs],
        device="cpu",
        absorb_layer_dict=absorb,
    )
    scales: dict[tuple[str, ...], torch.Tensor] = {}
    fold = algo.apply_scale

    def record_and_fold(scale_info):
        scales.update(scale_info)
        fold(scale_info)
        if spec.norm_offset:  # INC divides the norm's w by s; Gemma's scale is (offset + w)
            for tup, s in scale_info.items():
                norm = layer.get_submodule(algo.absorb_layer_dict[tup].removeprefix("layers.0."))
                if norm.weight.dim() == 1:  # (offset + w') = (offset + w) / s
                    norm.weight.data.add_(spec.norm_offset * (1.0 / s - 1.0))

    algo.apply_scale = record_and_fold
    algo.apply_quantize_with_clip = lambda return_int=False: None  # done below, per weight
    ours = scheme.search or scheme.float_zero_points  # our blocks: they fit their own clip
    with _searches_at_our_bits(utility):
        algo.quantize(use_auto_scale=True, use_mse_search=not ours, folding=True)

    result = LayerResult(i)
    block = "layers.0."
    cols: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    for tup, s in scales.items():
        for name in tup:
            cols[name.removeprefix(block)] = s.clone()
        owner = algo.absorb_layer_dict[tup].removeprefix(block)
        module = layer.get_submodule(owner)
        if isinstance(module, nn.Linear):  # its rows divided; its weight is quantized below
            rows[owner] = s.clone()
        else:
            result.changed[f"{prefix}{owner}.weight"] = module.weight.detach().clone()
        if getattr(module, "bias", None) is not None:
            result.changed[f"{prefix}{owner}.bias"] = module.bias.detach().clone()
    result.folded = {
        f"{prefix}{name}.weight": (cols.get(name), rows.get(name))
        for name in cols.keys() | rows.keys()
    }
    for name, m in _linears(layer).items():
        result.weights[f"{prefix}{name}.weight"] = m.weight.data  # quantized from copies
        if ours:
            from xcompile.weight_only import quantize_rtn

            q, scale, zp = quantize_rtn(m.weight.data, scheme.layout, scheme.search)
            result.quantized[f"{prefix}{name}.weight"] = _narrow(q, scale, zp, scheme)
            continue
        quantile = algo.weight_config.get(block + name, {}).get("quantile", 1.0)
        q, scale, zp = utility.quant_tensor(
            m.weight.data.clone(),
            bits=scheme.bits,
            group_size=scheme.group_size,
            scheme="sym" if scheme.sym else "asym",
            quantile=quantile,
            return_int=True,
        )
        result.quantized[f"{prefix}{name}.weight"] = _narrow(q, scale, zp, scheme)
    # INC's next-block inputs: the layer's FP32 outputs from before the scales were folded
    return result, [args[0] for args in algo.total_block_args]
