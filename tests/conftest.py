"""Shared fixtures: seeded tiny checkpoints per family, made with transformers from config, and
their compiled artifacts (built once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runtime/__init__.py; before torch loads
# the "verified" stamps of artifacts.verify go to a throwaway folder, not the user's cache
os.environ["XCOMPILE_CACHE"] = __import__("tempfile").mkdtemp(prefix="xcompile-test-cache-")

import pytest  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "gptj", "qwen3", "granite", "phi3", "gemma2", "gemma3")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> folder of a seeded random HF checkpoint (3 layers, GQA where the
    family has it)."""
    from xcompile.toy import make_checkpoint

    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_checkpoint(family, tmp_path_factory.mktemp(f"ckpt-{family}"))
        return made[family]

    return get


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, checkpoint):
    """compiled(family, dtype, passes) -> artifacts folder made by `xcompile quantize`.
    passes: None, every pass (the default); [] the primitive graph; or the names to run."""
    from xcompile.quantize import quantize

    made = {}

    def get(family: str, dtype: str = "fp32", passes: list[str] | None = None):
        key = (family, dtype, None if passes is None else tuple(passes))
        if key not in made:
            tag = "fused" if passes is None else ("primitive" if not passes else len(passes))
            out = tmp_path_factory.mktemp(f"art-{family}-{dtype}-{tag}") / "artifacts"
            quantize(checkpoint(family), out, dtype, progress=False, passes=passes)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    """hf_model(family, dtype=torch.float32) -> transformers' own model on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    made = {}

    def get(family: str, dtype=None):
        dtype = dtype or torch.float32
        if (family, dtype) not in made:
            made[family, dtype] = AutoModelForCausalLM.from_pretrained(
                checkpoint(family), dtype=dtype, attn_implementation="eager"
            ).eval()
        return made[family, dtype]

    return get


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _mapped_somewhere(names: set[str]) -> set[str]:
    """The /dev/shm names some other live process still maps: in use (another run's ranks on a
    shared machine), not left behind. This process's own mappings do not count."""
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                text = maps.read()
        except OSError:
            continue
        found |= {n for n in names if f"/dev/shm/{n}" in text}
    return found


@pytest.fixture(autouse=True)
def _no_shm_leftovers():
    """Every test leaves /dev/shm as it found it (the SHM allreduce's segment included): a new
    segment that no live process maps is one a test's ranks failed to remove."""
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    yield
    if os.path.isdir("/dev/shm"):
        new = {n for n in set(os.listdir("/dev/shm")) - before if "xcompile" in n}
        if new:
            new -= _mapped_somewhere(new)
            new &= set(os.listdir("/dev/shm"))  # removed meanwhile by whoever made it
        assert not new, f"left in /dev/shm: {sorted(new)}"


@pytest.fixture(scope="session")
def sharded(tmp_path_factory, compiled):
    """sharded(family, ranks, dtype) -> artifacts made by `xcompile shard` of compiled()."""
    from xcompile.shard import shard

    made = {}

    def get(family: str, ranks: int = 2, dtype: str = "fp32"):
        key = (family, ranks, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tp{ranks}-{family}-{dtype}") / "artifacts"
            shard(compiled(family, dtype), ranks, out, progress=False)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def real_model():
    """The FP32 SmolLM2-135M checkpoint (xcompile/real_model.py), built once into the
    repository's build/real/ and kept there between sessions."""
    from pathlib import Path

    from xcompile.real_model import build

    return build(Path(__file__).parents[1] / "build" / "real" / "smollm2-135m")


@pytest.fixture(scope="session")
def real_compiled(tmp_path_factory, real_model):
    """real_compiled(dtype) -> artifacts of the real model made by `xcompile quantize`."""
    from xcompile.quantize import quantize

    made = {}

    def get(dtype: str = "fp32"):
        if dtype not in made:
            out = tmp_path_factory.mktemp(f"real-{dtype}") / "artifacts"
            quantize(real_model, out, dtype, progress=False)
            made[dtype] = out
        return made[dtype]

    return get


def process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group: a server and any ranks it started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def run_xrun(
    args: list[str], launcher: list[str] | None = None, timeout: float = 180, cwd=None, env=None
) -> dict:
    """Run xrun (optionally under a launcher such as torchrun; env: variables to add) and return
    its --json object."""
    import json
    import os
    import subprocess
    import sys

    cmd = (launcher or [sys.executable, "-m", "xcompile.runtime.cli"]) + args + ["--json"]
    env = {**os.environ, **env} if env else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torchrun(ranks: int) -> list[str]:
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "-m",
        "xcompile.runtime.cli",
    ]


def bf16_matmul_atol(scale: float = 1.0) -> float:
    """How far a BF16 model's logits (largest magnitude `scale`) may move between the kernels
    and torch's fp32 reference on the same weights: below avx512_bf16 the kernels widen the
    weights to fp32 (tiny models: 5.5e-5 llama at scale 8.9, 4.2e-5 phi3 at 9.0): 1e-4. From
    avx512_bf16 on, BF16 matmuls carry x as hi + lo bf16 (each product within 2^-16,
    csrc/gemm_dpbf16.cpp), whose error grows through the layers with the model: 2.0e-4 llama,
    1.5e-4 gptj, 9.0e-4 phi3 (1.0e-4 of its scale): 1.5e-4 of the scale, at least 4e-4."""
    from xcompile.runtime.kernels import isa_at_least

    if isa_at_least("avx512_bf16"):
        return max(4e-4, 1.5e-4 * scale)
    return 1e-4


# the toy Gemma 2's final soft-cap of 2 would flatten the peaked logits (all near 2: ties);
# Gemma 3's seed 0 holds a top-2 margin of 0.17 at token 12 of its 16 greedy tokens (INT8's
# logit error reaches ~1 there: its q/k norms sharpen attention, as Qwen3's); seed 3's smallest
# FP32 margin is 1.22, INT8's largest change of a margin 0.63 (measured)
PEAKED = {"gemma2": dict(final_logit_softcapping=30.0), "gemma3": dict(seed=3)}


@pytest.fixture(scope="session")
def peaked(tmp_path_factory):
    """peaked(family, dtype) -> (checkpoint, artifacts) of a model whose next-token logit stands
    well above the rest, as a trained model's does (see xcompile.toy.make_checkpoint).
    dtype int8 / int4 (accuracy_level 4, int8 activations allowed) or int8-exact / int4-exact;
    int4 here is g128 symmetric, not the --int4 recipe: these test the kernels' activations;
    int4-recipe (-exact) is the CLI's --int4 (fp16 scales and float offsets, the mixed plan)."""
    from xcompile.quantize import quantize
    from xcompile.toy import make_checkpoint

    made = {}

    def get(family: str, dtype: str = "fp32"):
        if family not in made:
            folder = tmp_path_factory.mktemp(f"peaked-{family}")
            made[family] = (
                make_checkpoint(
                    family,
                    folder / "ckpt",
                    init_std=0.06,
                    peaked=True,
                    tie_word_embeddings=False,
                    **PEAKED.get(family, {}),
                ),
                {},
            )
        ckpt, arts = made[family]
        if dtype not in arts:
            arts[dtype] = ckpt.parent / dtype
            scheme = None
            level = 0 if dtype.endswith("-exact") else 4  # 0: activations stay fp32
            if dtype.startswith("int4-recipe"):  # the CLI's --int4: fp16 scales and offsets
                from dataclasses import replace

                from xcompile.weight_only import scheme_from_flags

                scheme = replace(scheme_from_flags(4, None, None, None, None, None), accuracy_level=level)
            elif dtype.startswith("int"):  # the kernels' layouts: per channel, or g128 symmetric
                from xcompile.weight_only import WeightOnly

                bits = 8 if dtype.startswith("int8") else 4
                scheme = WeightOnly(bits, -1 if bits == 8 else 128, True, accuracy_level=level)
            fmt = dtype.removesuffix("-exact").removesuffix("-recipe")
            quantize(ckpt, arts[dtype], fmt, progress=False, scheme=scheme)
        return ckpt, arts[dtype]

    return get


@pytest.fixture(scope="session")
def phi3_switch(tmp_path_factory):
    """(checkpoint, FP32 artifacts) of a Phi-3 whose longrope switches at 12 tokens: prompts
    on either side of it, and 16 new tokens that carry a short one past it."""
    from xcompile.quantize import quantize
    from xcompile.toy import TINY, make_checkpoint

    folder = tmp_path_factory.mktemp("phi3-switch")
    rope = {**TINY["phi3"]["rope_parameters"], "original_max_position_embeddings": 12}
    ckpt = make_checkpoint(
        "phi3", folder / "ckpt", seed=3, original_max_position_embeddings=12, rope_parameters=rope
    )
    quantize(ckpt, folder / "art", "fp32", progress=False)
    return ckpt, folder / "art"


@pytest.fixture(scope="session")
def hf_greedy_of():
    """hf_greedy_of(checkpoint, ids, n) -> transformers' n greedy tokens after ids."""
    import torch
    from transformers import AutoModelForCausalLM

    models = {}

    def run(ckpt, ids: list[int], n: int) -> list[int]:
        if ckpt not in models:
            models[ckpt] = AutoModelForCausalLM.from_pretrained(
                ckpt, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        with torch.no_grad():
            out = models[ckpt].generate(
                torch.tensor([ids]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()

    return run
