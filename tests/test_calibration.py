"""calibration.py: GPTQ and AWQ layer by layer. The single-layer driver reproduces transformers'
hidden states; each algorithm's output error on the calibration activations is below RTN's at
the same bits and group size; only one layer's tensors are read per layer; the artifacts hold
exactly what the driver made, and xrun runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
import torch
from safetensors.torch import load_file

from xcompile.calibration import LayerByLayer, calibration_lines, quantize_layers, tokenize
from xcompile.frontend.checkpoint import Checkpoint
from xcompile.passes.quantize_nbits import block_size_for, nbits_names
from xcompile.weight_only import WeightOnly, pack_quantized, quantize_rtn, unpack

PROMPT = "The quick brown fox jumps over the lazy dog"
PROMPTS = [PROMPT, "Once upon a time there was a small robot who loved to paint"]


def opened(folder):
    ckpt = Checkpoint.open(folder)
    return ckpt, ckpt.family.spec(ckpt.transformers_config())


@pytest.fixture
def one_thread():
    """The tiny layers' matmuls are all overhead: one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dequantize(q, scales, zp, scheme: WeightOnly) -> torch.Tensor:
    """INC's integer form -> W (N, K) float, through the artifacts' own layout."""
    k = q.shape[1]
    blocks, s, z = pack_quantized(q, scales, zp, scheme)
    return unpack(blocks, s, z, scheme.bits, block_size_for(scheme.group_size, k), k)


def effective(result, name: str, scheme: WeightOnly) -> torch.Tensor:
    """The quantized weight in the checkpoint's basis: AWQ's folded scales taken back out."""
    w = dequantize(*result.quantized[name], scheme)
    cols, rows = result.folded.get(name, (None, None))
    if rows is not None:
        w = w * rows.view(-1, 1)
    if cols is not None:
        w = w / cols.view(1, -1)
    return w


def linear_inputs(hf, samples) -> dict[str, torch.Tensor]:
    """weight name -> (tokens, K): what reaches each decoder linear in the FP32 model."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(
            lambda _, inp, out, n=n: seen.setdefault(n + ".weight", []).append(
                inp[0].reshape(-1, inp[0].shape[-1])
            )
        )
        for n, m in hf.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    with torch.no_grad():
        for ids in samples:
            hf(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


@pytest.mark.parametrize(
    "family", ["llama", "gptj", "mistral", "qwen3", "granite", "phi3", "gemma2", "gemma3"]
)
def test_layer_by_layer_reproduces_transformers(family, checkpoint, hf_model):
    """Embedding rows, rotary tables and the causal (mistral: sliding-window) mask as the
    driver builds them give transformers' own hidden states, layer after layer."""
    ckpt, spec = opened(checkpoint(family))
    decoder = LayerByLayer(ckpt, spec)
    samples = tokenize(ckpt, calibration_lines(None)[:3], 40)
    worst = 0.0
    with torch.no_grad():
        for ids in samples:
            ref = hf_model(family)(ids, output_hidden_states=True).hidden_states
            x = decoder.embed(ids)
            for i in range(spec.layers - 1):  # the last hidden state comes after the final norm
                x = decoder.layer(i)(x, **decoder.layer_kwargs(ids, i, x))
                worst = max(worst, (x - ref[i + 1]).abs().max().item())
    decoder.close()
    assert worst <= 1e-5


def errors_against_rtn(ckpt_dir, hf, scheme_args, lines=16, tokens=32):
    """Relative ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ per decoder linear on the calibration activations X of the
    FP32 model, for RTN, GPTQ and AWQ -> {algo: {weight: error}}."""
    ckpt, spec = opened(ckpt_dir)
    text = calibration_lines(None)[:lines]
    x = linear_inputs(hf, tokenize(ckpt, text, tokens))
    w = {n: p.detach() for n, p in hf.named_parameters() if n in x}

    def error(name, approx):
        exact = x[name] @ w[name].T
        return ((exact - x[name] @ approx.T).norm() / exact.norm()).item()

    rtn = WeightOnly(*scheme_args)
    out = {"rtn": {n: error(n, dequantize(*quantize_rtn(w[n], rtn), rtn)) for n in w}}
    for algo in ("gptq", "awq"):
        scheme = WeightOnly(*scheme_args, algo=algo)
        out[algo] = {}
        for result in quantize_layers(ckpt, spec, scheme, text, tokens):
            for name in result.quantized:
                out[algo][name] = error(name, effective(result, name, scheme))
    assert all(out[a].keys() == w.keys() for a in out)
    return out


# (family, WeightOnly's bits / group / sym, AWQ's total error at most this times RTN's)
CASES = [
    pytest.param("llama", (4, 32, True), 0.99, id="llama-int4-g32"),
    pytest.param("gptj", (4, 32, True), 0.99, id="gptj-int4-g32", marks=pytest.mark.slow),
    pytest.param("llama", (8, -1, True), 1.01, id="llama-int8-channel", marks=pytest.mark.slow),
    pytest.param("llama", (4, 128, False), 0.99, id="llama-int4-g128-asym", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family,scheme_args,awq_bound", CASES)
def test_gptq_and_awq_beat_rtn_on_calibration_activations(
    family, scheme_args, awq_bound, checkpoint, hf_model, one_thread
):
    """Measured on these tiny random models (sum over the 21 linears, relative errors; RTN,
    GPTQ, AWQ): int4 g32 llama 2.06 / 1.65 / 1.99; gptj 1.76 / 1.22 / 1.69; int4 g128 asymmetric
    llama 1.97 / 1.62 / 1.92; int8 per-channel llama 0.127 / 0.105 / 0.1275. GPTQ wins on every
    linear; AWQ (a random model has no salient channels to protect) on the sum at 4 bits. At 8
    bits per channel AWQ's grid finds nothing worth a scale (0.126 with its calibration of
    2026-11-27, 0.1275 since it runs on 512 tokens with our RTN for its last step, c239cec): there
    it must only do no harm."""
    errs = errors_against_rtn(checkpoint(family), hf_model(family), scheme_args)
    total = {algo: sum(e.values()) for algo, e in errs.items()}
    assert total["gptq"] < 0.9 * total["rtn"], total
    assert total["awq"] < awq_bound * total["rtn"], total
    assert all(errs["gptq"][n] < errs["rtn"][n] for n in errs["rtn"]), errs


def test_one_layer_read_at_a_time(checkpoint, monkeypatch, one_thread):
    """While layer i is quantized, the driver reads layer i's tensors and nothing else (the
    embedding's rows it reads one by one, before layer 0)."""
    ckpt, spec = opened(checkpoint("llama"))
    reads: list[str] = []
    read = LayerByLayer.tensor
    monkeypatch.setattr(
        LayerByLayer, "tensor", lambda self, name: reads.append(name) or read(self, name)
    )
    layers = quantize_layers(ckpt, spec, WeightOnly(4, 32, True, "gptq"), ["a b c d e f"] * 4)
    for i, result in enumerate(layers):
        prefix = spec.names.layer.format(i=i)
        assert reads and all(n.startswith(prefix) for n in reads), reads
        assert set(reads) == {n for n in ckpt.tensors if n.startswith(prefix)}
        assert {n.removeprefix(prefix) for n in result.quantized} == {
            getattr(spec.names, p) + ".weight" for p in ("q", "k", "v", "o", "gate", "up", "down")
        }
        reads.clear()
    assert i == spec.layers - 1


def test_awq_artifacts_hold_what_the_driver_made(peaked, tmp_path, one_thread):
    """GPT-J (LayerNorm with bias, parallel residual, v_proj absorbing o_proj's scale): the
    fused QKV+fc_in blocks are the parts' results row-concatenated, the rewritten LayerNorm
    weight and bias are stored, and the runtime's logits are nearer FP32's than RTN's. (Not
    tokens: this toy GPT-J has near-ties that any int4 error flips, GPTQ's too.)"""
    from xcompile.quantize import quantize

    ckpt_dir, fp32 = peaked("gptj", "fp32")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(calibration_lines(None)[:6]) + "\n")
    scheme = WeightOnly(4, 32, True, "awq", calib)
    art = tmp_path / "art"
    manifest = quantize(ckpt_dir, art, "int4", progress=False, scheme=scheme)
    assert manifest.quant["algo"] == "awq" and manifest.quant["calib"] == "calib.txt"

    stored = load_file(art / "rank0.safetensors")
    ckpt, spec = opened(ckpt_dir)
    result = next(quantize_layers(ckpt, spec, scheme))
    prefix = spec.names.layer.format(i=0)
    assert {prefix + "ln_1.weight", prefix + "ln_1.bias"} <= result.changed.keys()
    assert result.folded[prefix + "attn.v_proj.weight"][1] is not None  # rows: o_proj's scale
    for name, t in result.changed.items():
        assert torch.equal(stored[name], t), name
    graph = onnx.load(art / "model.onnx", load_external_data=False)
    concat = json.loads({p.key: p.value for p in graph.metadata_props}["xcompile.concat"])
    fused, parts = next((n, p) for n, p in concat.items() if prefix + "attn.q_proj.weight" in p)
    assert len(parts) == 4  # q, k, v and fc_in: all four read ln_1
    q, s, _ = zip(*(result.quantized[p] for p in parts))
    blocks, scales, _ = pack_quantized(torch.cat(q), torch.cat(s), None, scheme)
    qname, sname, _ = nbits_names(fused)
    assert torch.equal(stored[qname], blocks) and torch.equal(stored[sname], scales)

    rtn = tmp_path / "rtn"
    quantize(ckpt_dir, rtn, "int4", progress=False, scheme=WeightOnly(4, 32, True))
    err = logit_errors(fp32, {"awq": art, "rtn": rtn})
    assert err["awq"] < err["rtn"], err  # measured 0.162 against 0.178


def logit_errors(fp32, arts: dict) -> dict[str, float]:
    """name -> relative error of the artifacts' prefill logits against FP32's, averaged over
    two prompts that are not in the calibration text."""
    from xcompile.runtime.model import Model
    from xcompile.runtime.tokenizer import TextTokenizer

    ref = Model.load(fp32)
    ids = [TextTokenizer(fp32).encode(p) for p in PROMPTS]
    # logits: numpy fp32 (S, vocab), compared in torch
    want = [torch.from_numpy(ref.forward(i, 0, ref.new_cache(len(i) + 1))) for i in ids]
    out = {}
    for name, art in arts.items():
        model = Model.load(art)
        got = [torch.from_numpy(model.forward(i, 0, model.new_cache(len(i) + 1))) for i in ids]
        out[name] = sum(((g - w).norm() / w.norm()).item() for g, w in zip(got, want)) / len(ids)
    return out


@pytest.mark.parametrize("algo", ["gptq", "awq"])
def test_cli_quantize_then_xrun(algo, peaked, tmp_path):
    """`xcompile quantize --int4 --algo ALGO` (gptq: the shipped text; awq: --calib FILE), the
    default recipe (float offsets, the mixed plan: V and down at 8 bits in some layers, by RTN
    of the weights as the algorithm left them): the manifest says what was done and the
    runtime's first 8 greedy tokens are FP32's. (AWQ's 8-bit weights taken from the checkpoint
    instead, with their absorbers scaled, made garbage: PPL 3.3e6 on SmolLM2.)"""
    ckpt_dir, fp32 = peaked("llama", "fp32")
    flags = ["--int4", "--group-size", "32", "--algo", algo]
    if algo == "awq":
        (tmp_path / "lines.txt").write_text("\n".join(calibration_lines(None)[10:18]) + "\n")
        flags += ["--calib", str(tmp_path / "lines.txt")]
    out = tmp_path / "art"
    proc = subprocess.run(
        [sys.executable, "-m", "xcompile.cli", "quantize", str(ckpt_dir), "-o", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    quant = json.loads((out / "manifest.json").read_text())["quant"]
    assert quant["algo"] == algo and quant["bits"] == 4 and quant["group_size"] == 32
    assert quant["sym"] is False
    assert quant["calib"] == ("default" if algo == "gptq" else "lines.txt")
    assert (quant["zero_points"], quant["plan"], quant["search"]) == ("float", "mixed", True)
    assert greedy(out) == greedy(fp32)


def greedy(art, n=8) -> list[int]:
    """xrun's greedy tokens for PROMPT, in-process as tests/runtime/test_quantized.py runs it."""
    from xcompile.runtime.generate import generate
    from xcompile.runtime.model import Model
    from xcompile.runtime.sampling import Sampler, SamplingParams
    from xcompile.runtime.tokenizer import TextTokenizer

    ids = TextTokenizer(art).encode(PROMPT)
    return generate(Model.load(art), ids, n, Sampler(SamplingParams()), eos_ids=set()).tokens


@pytest.mark.slow
def test_calibrated_logits_closer_to_fp32_than_rtn(peaked, tmp_path):
    """End to end, the runtime included, int4 g32 with the shipped text: relative logit error
    against FP32 on prompts outside it measured RTN 0.196, GPTQ 0.110, AWQ 0.170."""
    from xcompile.quantize import quantize

    ckpt_dir, fp32 = peaked("llama", "fp32")
    arts = {}
    for algo in ("rtn", "gptq", "awq"):
        arts[algo] = tmp_path / algo
        quantize(ckpt_dir, arts[algo], "int4", progress=False, scheme=WeightOnly(4, 32, True, algo))
    err = logit_errors(fp32, arts)
    assert err["gptq"] < err["rtn"] and err["awq"] < err["rtn"], err


@pytest.mark.parametrize("family", ["qwen3", "granite", "phi3", "gemma2", "gemma3"])
def test_calibrated_families_run_and_gptq_beats_rtn(family, peaked, tmp_path, one_thread):
    """GPTQ and AWQ through each family's own transformers layer (Qwen3's q/k norms, Granite's
    multipliers, Phi-3's fused qkv_proj / gate_up_proj split into the graph's q/k/v and gate/up
    rows, Gemma's (1 + weight) norms absorbing AWQ's scales): the artifacts run, GPTQ's logits
    are nearer FP32's than RTN's, AWQ's no further than 5 % beyond RTN's (a random model has no
    salient channels). Measured, int4 g32 on 6
    lines: qwen3 RTN 0.280 GPTQ 0.251 AWQ 0.276; granite 0.092 0.077 0.094; phi3 0.232 0.207
    0.224; gemma2 0.310 0.231 0.278 (AWQ 0.315 before its scales folded into (1 + w) norms
    as (1 + w) / s); gemma3 0.493 0.423 0.456."""
    from xcompile.quantize import quantize

    ckpt_dir, fp32 = peaked(family, "fp32")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(calibration_lines(None)[:6]) + "\n")
    arts = {}
    for algo in ("rtn", "gptq", "awq"):
        arts[algo] = tmp_path / algo
        scheme = WeightOnly(4, 32, True, algo, None if algo == "rtn" else calib)
        quantize(ckpt_dir, arts[algo], "int4", progress=False, scheme=scheme)
    err = logit_errors(fp32, arts)
    print(family, {a: round(e, 3) for a, e in err.items()})
    assert err["gptq"] < err["rtn"] and err["awq"] < 1.05 * err["rtn"], err
    if family == "phi3":  # the fused tensor's result came back as its parts' rows
        ckpt, spec = opened(ckpt_dir)
        result = next(quantize_layers(ckpt, spec, WeightOnly(4, 32, True, "gptq", calib)))
        parts = {f"model.layers.0.{p}.weight" for _, ps in spec.names.fused for p in ps}
        assert parts <= result.quantized.keys()
        assert not any("qkv_proj" in n or "gate_up_proj" in n for n in result.quantized)
        assert result.quantized["model.layers.0.self_attn.q_proj.weight"][0].shape == (64, 64)
