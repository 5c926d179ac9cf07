"""The runtime stays slim: running artifacts imports no torch and none of the compile-time
packages (`pip install xcompile` installs none of them; .ci/slim runs xrun without them)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.runtime.test_server import READY, collect_stderr

NOT_IMPORTED = ("torch", "transformers", "neural_compressor", "onnxscript", "onnx_ir", "deepspeed")
# start-up time: onnx's package (~0.12 s) and ml_dtypes (~0.55 s) are read around, not imported
# (runtime/onnx_file.py, runtime/arrays.py)
NOT_IMPORTED += ("onnx", "ml_dtypes")


def top_level_imports(importtime: str) -> set[str]:
    """Top-level package names in `python -X importtime`'s report (stderr)."""
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in importtime.splitlines()
        if line.startswith("import time:")
    }


def test_xrun_imports_no_torch(compiled, tmp_path):
    art = compiled("llama")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "xcompile.runtime.cli", str(art)]
        + ["--prompt", "hi", "--max-new-tokens", "2", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = top_level_imports(proc.stderr)
    assert {"tokenizers", "numpy", "google"} <= imported  # the probe sees real imports (protobuf)
    assert not imported & set(NOT_IMPORTED), sorted(imported & set(NOT_IMPORTED))


def test_xrun_serve_starts_without_torch(compiled, tmp_path):
    """--serve up to its ready line (fastapi, uvicorn and the engine loaded), then Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "xcompile.runtime.cli", str(compiled("llama"))]
        + ["--serve", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    lines, ready = collect_stderr(proc)  # the ready line comes after every start-up import
    try:
        deadline = time.monotonic() + 120
        while not ready.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
            pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    report = "".join(lines)
    assert READY.search(report), report[-2000:]
    imported = top_level_imports(report)
    assert {"tokenizers", "numpy", "fastapi", "uvicorn"} <= imported
    assert not imported & set(NOT_IMPORTED), sorted(imported & set(NOT_IMPORTED))
