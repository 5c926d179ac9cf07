"""The runtime stays slim: running artifacts imports none of the compile-time packages."""

from __future__ import annotations

import subprocess
import sys

COMPILE_TIME = ("transformers", "neural_compressor", "onnxscript", "onnx_ir", "deepspeed")


def test_xrun_imports_no_compile_time_package(compiled, tmp_path):
    art = compiled("llama")
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "xcompile.runtime.cli",
            str(art),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "torch" in imported and "tokenizers" in imported  # the probe sees real imports
    assert not imported & set(COMPILE_TIME)
