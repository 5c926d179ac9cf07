"""The demo's commands (demo.sh) leave the terminal to xcompile: none of the third-party lines that
xcompile/quiet.py switches off reach stderr.

Each command runs as the demo runs it, in a subprocess with stderr captured: `xcompile quantize`
and `xrun --chat` on a tiny seeded checkpoint, `python -m xcompile.real_model` on a finished
folder (a no-op) and, marked slow, on the real GGUF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
REAL = ROOT / "build" / "real"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

# what the imports and transformers print when nothing silences them
NOISE = (
    "Failed to load",  # torchao: "Failed to load .../_C_mxfp8...so: Could not load this library"
    "_C_mxfp8",
    "_pytree.py",  # torch: "W1204 ... torch/utils/_pytree.py:630] <enum ...> is an Enum subclass"
    "register_constant",
    "Auto detect accelerator",  # neural-compressor
    "Converting and de-quantizing GGUF tensors",  # transformers' progress bars
    "Loading weights",
    "Writing model shards",
)


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


def run(cmd: list, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd],
        input=stdin,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _script(name: str) -> str:
    """The console script installed beside this interpreter (falls back to PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name) or name


def test_unquieted_import_is_noisy():
    """The control: the import that `xcompile quantize` makes inside quiet_imports does print
    these lines without it, so the tests below check something. Skips where nothing is printed
    (a machine where torchao's extensions load, or no torchao)."""
    res = run([sys.executable, "-c", "import transformers.models.llama.modeling_llama"])
    assert res.returncode == 0, res.stderr[-3000:]
    if not noise(res.stderr):
        pytest.skip("these imports print nothing here: nothing to silence")


def test_quantize_and_chat_are_quiet(checkpoint, tmp_path):
    out = tmp_path / "artifacts"
    res = run([_script("xcompile"), "quantize", checkpoint("llama"), "-o", out, "--int8"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert noise(res.stderr) == [], res.stderr[-3000:]
    assert res.stdout.startswith(f"wrote {out}")

    res = run(
        [_script("xrun"), out, "--chat", "--max-new-tokens", 4], stdin="What is the capital?\n"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert noise(res.stderr) == [], res.stderr[-3000:]
    assert res.stdout.strip()


def _finished_folders(tmp_path: Path) -> list[Path]:
    """A stand-in for a finished build (its done-stamp only) and, where built, the real one."""
    from xcompile.real_model import DONE

    stand_in = tmp_path / "real" / "smollm2-135m"
    stand_in.mkdir(parents=True)
    (stand_in / DONE).write_text("stand-in\n")
    real = REAL / "smollm2-135m"
    return [stand_in] + ([real] if (real / DONE).is_file() else [])


def test_real_model_finished_folder_is_a_quiet_noop(tmp_path):
    for folder in _finished_folders(tmp_path):
        before = {p: p.stat().st_mtime_ns for p in folder.parent.rglob("*")}
        res = run([sys.executable, "-m", "xcompile.real_model", folder], timeout=60)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stderr == ""
        assert res.stdout == f"{folder}\n"
        assert {p: p.stat().st_mtime_ns for p in folder.parent.rglob("*")} == before


@pytest.mark.slow
def test_real_model_build_is_quiet(tmp_path):
    """The whole build (GGUF dequantized, FP32 checkpoint written) from the GGUF already fetched
    into build/real/gguf; the download is pip's and not repeated here."""
    gguf = REAL / "gguf"
    if not any(gguf.glob("*.gguf")):
        pytest.skip(f"{gguf}: no GGUF fetched yet (python -m xcompile.real_model builds it)")
    (tmp_path / "gguf").symlink_to(gguf)
    res = run([sys.executable, "-m", "xcompile.real_model", tmp_path / "smollm2"], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert noise(res.stderr) == [], res.stderr[-3000:]
    assert (tmp_path / "smollm2" / "model.safetensors").is_file()
