"""Shared fixtures: seeded tiny checkpoints per family, made with transformers from config, and
their compiled artifacts (built once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runtime/__init__.py; before torch loads
# the "verified" stamps of artifacts.verify go to a throwaway folder, not the user's cache
os.environ["XCOMPILE_CACHE"] = __import__("tempfile").mkdtemp(prefix="xcompile-test-cache-")

import pytest  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "gptj")


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
                checkpoint(family), dtype=dtype, attn_implementation="eager").eval()
        return made[family, dtype]

    return get


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
