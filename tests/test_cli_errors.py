"""Bad input, end to end through the real console scripts (`xcompile`, `xrun`).

The contract (DESIGN.md, CLI): exit code 2, exactly one line on stderr naming the problem and the
fix, no traceback unless --verbose, and no output folder (nor its hidden temporary sibling) left
behind. Every case runs the installed script in a subprocess whose cwd is a fresh tmp folder, and
tampers only with copies of the session fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _script(name: str) -> str:
    """The console script installed beside this interpreter (falls back to PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name) or name


def run(cwd: Path, prog: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_script(prog), *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def user_error(res: subprocess.CompletedProcess, *words: str) -> str:
    """Assert the one-line bad-input contract; return the line. `words` must appear in it
    (case-insensitive): the problem and the fix."""
    detail = f"rc={res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 2, detail
    assert "Traceback" not in res.stderr, detail
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    line = lines[0]
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in: {line}"
    return line


def no_output(cwd: Path, name: str = "out") -> None:
    """Neither the output folder nor a hidden temporary sibling (.NAME.tmp-*, .NAME.old-*)."""
    assert not (cwd / name).exists(), sorted(p.name for p in cwd.iterdir())
    left = sorted(p.name for p in cwd.iterdir() if p.name.startswith(f".{name}."))
    assert not left, left


def snapshot(path: Path) -> dict:
    """Every file under `path` (or `path` itself) with its bytes and mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    return {
        str(p.relative_to(path.parent)): (
            p.is_dir(),
            p.read_bytes() if p.is_file() else b"",
            p.stat().st_mtime_ns,
        )
        for p in files
    }


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A private copy of the tiny llama checkpoint, to break; the cwd is tmp_path/work."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama"), dst)
    (tmp_path / "work").mkdir()
    return dst


@pytest.fixture
def art(compiled, tmp_path):
    """A private copy of the tiny llama fp32 artifacts, to break."""
    dst = tmp_path / "art"
    shutil.copytree(compiled("llama", "fp32"), dst)
    (tmp_path / "work").mkdir()
    return dst


def quantize(ckpt: Path, *flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`xcompile quantize CKPT -o out FLAGS` in tmp_path/work; (result, that folder)."""
    work = ckpt.parent / "work"
    return run(work, "xcompile", "quantize", ckpt, "-o", "out", *flags), work


def write_manifest(art: Path, **changes) -> None:
    m = json.loads((art / "manifest.json").read_text())
    for k, v in changes.items():
        if v is ...:
            m.pop(k, None)
        else:
            m[k] = v
    (art / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------
# xcompile quantize: the checkpoint


def test_missing_checkpoint_folder(tmp_path):
    res = run(tmp_path, "xcompile", "quantize", "no-such-model", "-o", "out", "--fp32")
    user_error(res, "no-such-model", "no such checkpoint folder", "config.json")
    no_output(tmp_path)


def test_checkpoint_without_config(ckpt):
    (ckpt / "config.json").unlink()
    res, work = quantize(ckpt, "--fp32")
    user_error(res, str(ckpt), "no config.json", "Hugging Face model folder")
    no_output(work)


@pytest.mark.parametrize("breakage", ["not-json", "directory", "not-object"])
def test_config_unreadable_or_not_json(ckpt, breakage):
    cfg = ckpt / "config.json"
    cfg.unlink()
    if breakage == "not-json":
        cfg.write_text('{"architectures": ["LlamaForCausalLM"],')
    elif breakage == "directory":  # unreadable even as root (chmod 000 is not)
        cfg.mkdir()
    else:
        cfg.write_text('["LlamaForCausalLM"]')
    res, work = quantize(ckpt, "--fp32")
    user_error(res, "config.json", "fix or re-download")
    no_output(work)


@pytest.mark.parametrize("archs", [["BertForMaskedLM"], None])
def test_unsupported_architecture(ckpt, archs):
    cfg = json.loads((ckpt / "config.json").read_text())
    if archs is None:
        cfg.pop("architectures")
    else:
        cfg["architectures"] = archs
    (ckpt / "config.json").write_text(json.dumps(cfg))
    res, work = quantize(ckpt, "--fp32")
    line = user_error(res, "not supported", "supported families")
    for family in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPTJForCausalLM"):
        assert family in line, line
    if archs:
        assert "BertForMaskedLM" in line
    no_output(work)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    res, work = quantize(ckpt, "--fp32")
    user_error(res, "tokenizer.json", "save_pretrained")
    no_output(work)


@pytest.mark.parametrize("pickle", [False, True], ids=["nothing", "pytorch_model.bin"])
def test_no_safetensors(ckpt, pickle):
    weights = ckpt / "model.safetensors"
    if pickle:
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(weights), ckpt / "pytorch_model.bin")
    weights.unlink()
    res, work = quantize(ckpt, "--fp32")
    line = user_error(res, "no *.safetensors")
    if pickle:
        assert "pickle" in line and "convert them to safetensors" in line, line
    no_output(work)


def test_truncated_safetensors(ckpt):
    weights = ckpt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    res, work = quantize(ckpt, "--fp32")
    user_error(res, "model.safetensors", "truncated", "re-create")
    no_output(work)


def test_checkpoint_lacks_a_tensor(ckpt):
    from safetensors.torch import load_file, save_file

    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights)
    res, work = quantize(ckpt, "--fp32")
    user_error(res, "model.norm.weight", "llama", "complete")
    no_output(work)


# ---------------------------------------------------------------------------------------------
# xcompile quantize: the output and the flags


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_output_exists_and_is_not_artifacts(ckpt, kind):
    work = ckpt.parent / "work"
    out = work / "out"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("precious\n")
    else:
        out.write_text("precious\n")
    before = snapshot(out)
    res = run(work, "xcompile", "quantize", ckpt, "-o", "out", "--fp32")
    user_error(res, "out", "not xcompile artifacts", "choose another -o or remove it")
    assert snapshot(out) == before
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no temporary sibling either


@pytest.mark.parametrize("flags", [[], ["--fp32", "--bf16"]], ids=["none", "two"])
def test_dtype_flags(ckpt, flags):
    res, work = quantize(ckpt, *flags)
    user_error(res, "exactly one", "--fp32", "--bf16", "--int8")
    no_output(work)


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--int4", "--group-size", "7"], ["--group-size 7", "power of two"]),
        (["--int4", "--group-size", "8"], ["--group-size 8", "power of two"]),
        (["--int8", "--algo", "gptq", "--calib", "missing.txt"], ["missing.txt", "no such file"]),
        (["--int8", "--algo", "gptq", "--calib", "empty.txt"], ["empty.txt", "empty"]),
        (["--fp32", "--algo", "gptq"], ["--algo", "--int8 or --int4"]),
        (["--bf16", "--group-size", "32"], ["--group-size", "--int8 or --int4"]),
        (["--int8", "--algo", "magic"], ["--algo", "rtn"]),
        (["--int4", "--calib", "lines.txt"], ["--calib", "gptq or awq"]),
    ],
    ids=[
        "int4-group-7",
        "int4-group-8",
        "calib-missing",
        "calib-empty",
        "algo-without-bits",
        "group-without-bits",
        "unknown-algo",
        "calib-without-gptq-or-awq",
    ],
)
def test_quantization_flags(ckpt, flags, words):
    res, work = quantize(
        ckpt, *[str(ckpt.parent / "work" / f) if f.endswith(".txt") else f for f in flags]
    )
    work.mkdir(exist_ok=True)
    if "empty.txt" in flags:  # run again now that the empty file exists
        (work / "empty.txt").write_text("   \n")
        res, work = quantize(ckpt, *[str(work / f) if f.endswith(".txt") else f for f in flags])
    user_error(res, *words)
    assert not (work / "out").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".out.")]


def test_unknown_flag(tmp_path):
    res = run(tmp_path, "xcompile", "quantize", "model", "-o", "out", "--fp32", "--fp8")
    user_error(res, "--fp8", "xcompile --help")
    no_output(tmp_path)


# ---------------------------------------------------------------------------------------------
# xrun: the artifacts


def xrun(art: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(art.parent / "work", "xrun", art, "--prompt", "Once upon a time", "-n", "2", *extra)


def test_artifacts_missing(tmp_path):
    res = run(tmp_path, "xrun", "no-such-artifacts", "--prompt", "hi")
    user_error(res, "no-such-artifacts", "no such artifacts folder", "xcompile quantize")


def test_artifacts_without_manifest(art):
    (art / "manifest.json").unlink()
    user_error(xrun(art), "no manifest.json", "xcompile quantize")


def test_manifest_unknown_format_version(art):
    write_manifest(art, format_version=99)
    user_error(xrun(art), "format_version 99", "rebuild the artifacts")


@pytest.mark.parametrize(
    "change",
    [
        {"ranks": "1"},
        {"files": []},
        {"family": ...},
        {"extra_key": 1},
        {"files": {"rank0.safetensors": {"size": "709352", "sha256": "0" * 64}}},
    ],
    ids=["ranks-str", "files-list", "family-missing", "unknown-key", "entry-size-str"],
)
def test_manifest_wrong_types_or_unknown_keys(art, change):
    write_manifest(art, **change)
    key = next(iter(change))
    line = user_error(xrun(art), "manifest.json", "rebuild the artifacts")
    assert (key if key != "files" or isinstance(change[key], list) else "rank0.safetensors") in line


def test_file_size_differs(art):
    weights = art / "rank0.safetensors"
    os.truncate(weights, weights.stat().st_size - 8)
    user_error(xrun(art), "rank0.safetensors", "bytes, manifest says", "rebuild the artifacts")


def test_file_sha256_differs(art):
    weights = art / "rank0.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(size - 3)
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert weights.stat().st_size == size
    user_error(xrun(art), "rank0.safetensors", "sha256", "rebuild the artifacts")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/../../x"])
def test_manifest_entry_escapes_folder(art, name):
    m = json.loads((art / "manifest.json").read_text())
    m["files"][name] = {"size": 1, "sha256": "0" * 64}
    (art / "manifest.json").write_text(json.dumps(m))
    user_error(xrun(art), name, "outside the artifacts", "rebuild")


def test_manifest_entry_symlink_escapes_folder(art, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (art / "tokenizer_config.json").unlink()
    (art / "tokenizer_config.json").symlink_to(outside)
    user_error(xrun(art), "tokenizer_config.json", "outside the artifacts", "rebuild")


def test_prompt_longer_than_context(art):
    prompt = " ".join(f"w{i}" for i in range(400))  # max_position_embeddings is 256
    res = run(art.parent / "work", "xrun", art, "--prompt", prompt, "-n", "2")
    user_error(res, "context is 256", "shorten the prompt")


@pytest.mark.parametrize(
    "flag",
    [
        ["--max-new-tokens", "0"],
        ["--temperature", "-1"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--top-k", "-1"],
        ["--max-new-tokens", "many"],
    ],
    ids=lambda f: "=".join(f),
)
def test_bad_flag_values(art, flag):
    line = user_error(xrun(art, *flag), flag[0])
    assert "see xrun --help" in line or "must be" in line, line


def test_unknown_xrun_flag(tmp_path):
    res = run(tmp_path, "xrun", "art", "--prompt", "hi", "--beam-width", "3")
    user_error(res, "--beam-width", "xrun --help")


# ---------------------------------------------------------------------------------------------
# the base install (`pip install xcompile`, no torch): compiling, --reference and --backend torch
# say which extra to install. torch is hidden from the child (None in sys.modules: its import
# fails as if it were not installed); .ci/slim runs the real thing in a venv without it.

WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.argv[0] = {prog!r}; from {module} import main; "
    "main()"
)


def run_without_torch(cwd: Path, prog: str, *args: str) -> subprocess.CompletedProcess:
    module = {"xcompile": "xcompile.cli", "xrun": "xcompile.runtime.cli"}[prog]
    code = WITHOUT_TORCH.format(prog=prog, module=module)
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.parametrize("command", ["quantize", "build"])
def test_compile_without_torch(ckpt, command):
    work = ckpt.parent / "work"
    res = run_without_torch(work, "xcompile", command, ckpt, "-o", "out", "--fp32")
    user_error(res, f"xcompile {command}", "torch", 'pip install "xcompile[compile]"')
    no_output(work)


def test_shard_without_torch(art):
    work = art.parent / "work"
    res = run_without_torch(work, "xcompile", "shard", art, "--ranks", "2", "-o", "out")
    user_error(res, "xcompile shard", "torch", 'pip install "xcompile[compile]"')
    no_output(work)


def test_inspect_without_torch(art):
    res = run_without_torch(art.parent / "work", "xcompile", "inspect", art)
    assert res.returncode == 0, res.stderr
    assert "family      llama" in res.stdout and "parameters" in res.stdout, res.stdout


def test_reference_without_torch(art):
    res = run_without_torch(art.parent / "work", "xrun", art, "--prompt", "hi", "--reference")
    user_error(res, "--reference needs torch", 'pip install "xcompile[compile]"')


# ---------------------------------------------------------------------------------------------
# --verbose: the traceback is there for whoever asks


def test_verbose_shows_traceback(tmp_path):
    res = run(tmp_path, "xrun", "no-such-artifacts", "--prompt", "hi", "--verbose")
    assert res.returncode != 0
    assert "Traceback" in res.stderr, res.stderr
    assert "UserError" in res.stderr and "no such artifacts folder" in res.stderr
    res = run(tmp_path, "xcompile", "quantize", "no-such-model", "-o", "out", "--fp32", "--verbose")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "no such checkpoint folder" in res.stderr, res.stderr
    no_output(tmp_path)
