"""llama.cpp, the peer, built from the registry: the `llama-cpp-python` sdist vendors it.

    tools = LlamaCpp.build()                         # once: build/llama.cpp/ (~8 min on 2 cores)
    gguf = tools.convert(checkpoint, "f32")          # its convert_hf_to_gguf.py, cached
    q4 = tools.quantize(gguf, "q4_k_m")              # llama-quantize, cached
    ppl = tools.perplexity(q4, text, ctx=512, chunks=16)   # llama-perplexity's final estimate

Everything lands under build/ (ignored). Used by benchmarks/quality.py (and the speed benchmarks).
A freshly trained byte-level BPE tokenizer has no known pre-tokenizer hash and the converter stops
("BPE pre-tokenizer was not recognized"); for such a tokenizer, and only then, the converter is
told to use llama.cpp's `gpt-2` pre-tokenizer (../shared/PEERS.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "build" / "llama.cpp"
SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-cli")
# the converter, run with the unknown-hash fallback (see the module docstring)
CONVERT = """
import sys
sys.path.insert(0, {source!r} + "/gguf-py")
sys.path.insert(0, {source!r})
import convert_hf_to_gguf as c
try:
    from conversion.base import TextModel as base
except ImportError:  # older llama.cpp: the classes live in the script
    base = getattr(c, "TextModel", None) or c.Model
original = base.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
c.main()
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


@dataclass
class LlamaCpp:
    source: Path  # vendor/llama.cpp
    bin: Path

    @classmethod
    def build(cls, home: Path = HOME) -> LlamaCpp:
        """The sdist fetched and its llama.cpp built with -DGGML_NATIVE=ON, once."""
        bin_dir = home / "build" / "bin"
        source = home / "src"
        if all((bin_dir / t).is_file() for t in TARGETS):
            return cls(source, bin_dir)
        home.mkdir(parents=True, exist_ok=True)
        if not (source / "CMakeLists.txt").is_file():
            with tempfile.TemporaryDirectory() as tmp:
                _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                      "--no-binary", ":all:", SDIST, "-d", tmp])  # fmt: skip
                archive = next(Path(tmp).glob("*.tar.gz"))
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
                vendored = next(Path(tmp).glob("*/vendor/llama.cpp"))
                if source.exists():
                    shutil.rmtree(source)
                shutil.move(str(vendored), source)
        print(f"building llama.cpp ({', '.join(TARGETS)}) in {home} ...", file=sys.stderr)
        _run(["cmake", "-S", str(source), "-B", str(home / "build"), "-DGGML_NATIVE=ON",
              "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"])  # fmt: skip
        _run(["cmake", "--build", str(home / "build"), f"-j{os.cpu_count() or 2}",
              "--target", *TARGETS])  # fmt: skip
        return cls(source, bin_dir)

    def convert(self, checkpoint: Path, outtype: str = "f32") -> Path:
        """HF checkpoint -> GGUF (cached beside the other models under build/llama.cpp)."""
        out = HOME / "models" / f"{Path(checkpoint).name}-{outtype}.gguf"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            script = CONVERT.format(source=str(self.source))
            part = out.with_suffix(".part")
            try:
                _run([sys.executable, "-c", script, str(checkpoint), "--outtype", outtype,
                      "--outfile", str(part)])  # fmt: skip
            except subprocess.CalledProcessError as e:  # e.g. No module named 'sentencepiece'
                raise RuntimeError(
                    f"convert_hf_to_gguf.py failed on {checkpoint} (its converter needs gguf and "
                    f"sentencepiece: pip install sentencepiece):\n{e.stderr[-2000:]}"
                ) from None
            part.rename(out)
        return out

    def quantize(self, gguf: Path, kind: str) -> Path:
        """llama-quantize GGUF -> kind (q8_0, q4_0, q4_k_m, ...), cached."""
        out = gguf.with_name(gguf.name.replace("-f32.gguf", f"-{kind}.gguf"))
        if not out.is_file():
            part = out.with_suffix(".part")
            _run([str(self.bin / "llama-quantize"), str(gguf), str(part), kind])
            part.rename(out)
        return out

    def perplexity(self, gguf: Path, text: Path, ctx: int, chunks: int, threads: int = 2):
        """llama-perplexity's final estimate -> (ppl, its +/- error); --no-repack where its
        default run dies (_run_or_without_repack)."""
        done, _ = _run_or_without_repack(
            [str(self.bin / "llama-perplexity"), "-m", str(gguf), "-f", str(text),
             "-c", str(ctx), "--chunks", str(chunks), "-b", str(ctx), "-t", str(threads)],
            "--no-repack",
        )  # fmt: skip
        estimate = r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)"
        found = re.search(estimate, done.stdout + done.stderr)
        if not found:
            raise RuntimeError(f"llama-perplexity printed no estimate:\n{done.stderr[-2000:]}")
        return float(found.group(1)), float(found.group(2))

    def bench(self, gguf: Path, args: list[str]) -> tuple[list[dict], bool]:
        """llama-bench -o json with these arguments -> (its records, whether its weights were
        repacked: False where the default run died and `--repack 0` ran instead)."""
        done, repacked = _run_or_without_repack(
            [str(self.bin / "llama-bench"), "-m", str(gguf), "-o", "json", *args],
            "--repack", "0",
        )  # fmt: skip
        return json.loads(done.stdout), repacked


def _run_or_without_repack(cmd: list[str], *no_repack: str):
    """-> (the finished run, True); where the tool dies on a signal (llama.cpp's AMX path, which
    takes the weights repacked, crashes on some hosts: SIGSEGV / SIGILL on Q8_0 and Q4_0 prompts
    on a KVM Xeon with AMX), once more with `no_repack`, its flag for the same arithmetic
    without that path -> (that run, False)."""
    try:
        return _run(cmd), True
    except subprocess.CalledProcessError as e:
        if e.returncode >= 0:
            raise
        try:
            name = signal.Signals(-e.returncode).name
        except ValueError:
            name = f"signal {-e.returncode}"
        print(f"{Path(cmd[0]).name} died ({name}): again with {' '.join(no_repack)}",
              file=sys.stderr, flush=True)  # fmt: skip
        return _run([*cmd, *no_repack]), False
