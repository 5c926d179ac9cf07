"""The artifact format module: safetensors writing and header validation, the manifest schema,
verify, and the atomic output folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xcompile import artifacts
from xcompile.artifacts import (
    AtomicFolder,
    Manifest,
    PlannedTensor,
    SafetensorsWriter,
    read_manifest,
    read_safetensors_header,
)
from xcompile.errors import UserError
from xcompile.runtime.arrays import to_torch

# ---------------------------------------------------------------------------------------------
# SafetensorsWriter: read back by the real safetensors library


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


MIXED = {
    "layer.weight": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
    "layer.bf16": torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).bfloat16(),
    "ids": torch.arange(-3, 6, dtype=torch.int64).view(3, 3),
    "empty": torch.empty(0, 4, dtype=torch.float32),
    "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
    "scalar": torch.tensor(2.5, dtype=torch.float32),
    "odd.bf16": torch.randn(3, generator=torch.Generator().manual_seed(2)).bfloat16(),
}
SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> SafetensorsWriter:
    planned = [PlannedTensor(n, SAFE_DTYPES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    w = SafetensorsWriter(path, planned)
    for name in w.order():
        w.write(name, _bytes(tensors[name]))
    w.close()
    return w


def test_writer_round_trips_through_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    w = _write(path, MIXED)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(MIXED)
        for name, want in MIXED.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
    # the manifest entry is hashed while writing, and matches a second read
    assert w.entry() == artifacts.file_entry(path)
    # our own validated header agrees, and every tensor is aligned to its element size
    header = read_safetensors_header(path)
    assert set(header) == set(MIXED)
    for name, info in header.items():
        assert info.shape == tuple(MIXED[name].shape)
        assert info.begin % artifacts.DTYPES[info.dtype][0] == 0, name
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # header padded
    # and map_tensors (the runtime's loader) gives the same values
    mapped = dict(artifacts.map_tensors(path))
    for name, want in MIXED.items():
        got = to_torch(mapped[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_writer_refuses_writes_off_plan(tmp_path):
    planned = [PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "I64", (1,))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", planned)
    first, second = w.order()
    with pytest.raises(RuntimeError):
        w.write(second, b"\0" * 8)  # out of order
    with pytest.raises(RuntimeError):
        w.write(first, b"\0" * 4)  # wrong size
    w.write(first, b"\0" * 8)
    with pytest.raises(RuntimeError):
        w.close()  # before every tensor was written
    w._f.close()


def test_header_reads_safetensors_own_files(tmp_path):
    path = tmp_path / "st.safetensors"
    save_file(
        {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.int64)},
        str(path),
        metadata={"format": "pt"},
    )
    header = read_safetensors_header(path)
    assert set(header) == {"a", "b"}
    assert header["a"].dtype == "F32" and header["a"].shape == (2, 3)
    assert header["b"].nbytes == 32


# ---------------------------------------------------------------------------------------------
# read_safetensors_header: refuses every malformed file with a UserError


def _raw_file(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_header_refuses_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    _write(path, MIXED)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(UserError, match="truncated"):
        read_safetensors_header(path)
    path.write_bytes(data + b"\0")  # trailing bytes are as wrong as missing ones
    with pytest.raises(UserError, match="does not match its header"):
        read_safetensors_header(path)
    path.write_bytes(data[:5])  # shorter than the length field
    with pytest.raises(UserError, match="too short"):
        read_safetensors_header(path)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="too short"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "entries",
    [
        {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)},  # overlap
        {
            "a": _entry("F32", [2], 0, 8),
            "b": _entry("F32", [2], 8, 16),
            "c": _entry("F32", [1], 4, 8),
        },  # overlap, inside
        {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)},  # hole
        {"a": _entry("F32", [2], 4, 12)},  # hole at the start
    ],
    ids=["overlap", "overlap-inside", "hole", "hole-at-start"],
)
def test_header_refuses_overlapping_or_holey_offsets(tmp_path, entries):
    end = max(e["data_offsets"][1] for e in entries.values())
    path = _raw_file(tmp_path / "x.safetensors", entries, b"\0" * end)
    with pytest.raises(UserError, match="overlap or hole"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "entry",
    [
        _entry("F32", [3], 0, 8),  # offsets disagree with the shape
        _entry("F32", [2], 8, 0),  # end before begin
        _entry("F32", [-2], 0, 8),  # negative dimension
        _entry("F32", [2.0], 0, 8),  # float dimension
        _entry("F32", [2], 0, 16),  # runs past the end of the file
        {"dtype": "F32", "shape": [2]},  # no offsets
        [1, 2],  # not an object
    ],
    ids=[
        "size-vs-shape",
        "reversed",
        "negative-dim",
        "float-dim",
        "past-eof",
        "no-offsets",
        "not-object",
    ],
)
def test_header_refuses_malformed_entries(tmp_path, entry):
    path = _raw_file(tmp_path / "x.safetensors", {"a": entry}, b"\0" * 8)
    with pytest.raises(UserError):
        read_safetensors_header(path)


@pytest.mark.parametrize("dtype", ["F8_E4M3", ["F32"], {"F32": 1}, 4, None])
def test_header_refuses_unknown_dtype(tmp_path, dtype):
    """Found by the fuzzer (tests/faults): a list or object as dtype raised TypeError."""
    path = _raw_file(tmp_path / "x.safetensors", {"a": _entry(dtype, [2], 0, 2)}, b"\0" * 2)
    with pytest.raises(UserError, match="unsupported dtype"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe{}", b"[1, 2]", b"[" * 100_000],
    ids=["not-json", "not-utf8", "not-object", "deep"],
)
def test_header_refuses_bad_json(tmp_path, raw):
    path = _raw_file(tmp_path / "x.safetensors", raw, b"")
    with pytest.raises(UserError, match="corrupt safetensors header"):
        read_safetensors_header(path)


@pytest.mark.parametrize("length", [1_000, 2**63, artifacts.MAX_HEADER_BYTES + 1])
def test_header_refuses_length_past_eof(tmp_path, length):
    path = _raw_file(
        tmp_path / "x.safetensors", {"a": _entry("F32", [1], 0, 4)}, b"\0" * 4, length=length
    )
    with pytest.raises(UserError, match="header length"):
        read_safetensors_header(path)


def test_header_refuses_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        read_safetensors_header(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# read_manifest and verify


@pytest.fixture
def folder(tmp_path):
    """A small valid artifacts folder: one weight file listed in its manifest."""
    root = tmp_path / "art"
    root.mkdir()
    _write(root / "rank0.safetensors", {"w": torch.ones(2, 2)})
    m = Manifest(
        family="llama",
        dtype="fp32",
        ranks=1,
        source={"path": "/x", "config_sha256": "0" * 64},
        passes=[],
        files={"rank0.safetensors": artifacts.file_entry(root / "rank0.safetensors")},
        config={"layers": 1},
    )
    artifacts.write_manifest(root, m)
    return root


def _edit(root: Path, **changes) -> None:
    data = json.loads((root / "manifest.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    (root / "manifest.json").write_text(json.dumps(data))


def test_manifest_round_trip(folder):
    m = read_manifest(folder)
    assert m.format_version == artifacts.FORMAT_VERSION and m.ranks == 1 and m.quant is None
    artifacts.verify(folder, m)
    assert not (folder / "manifest.json.part").exists()


def test_manifest_refuses_unknown_keys(folder):
    _edit(folder, shards=2)
    with pytest.raises(UserError, match=r"unknown keys \['shards'\]"):
        read_manifest(folder)


@pytest.mark.parametrize(
    "change",
    [
        {"ranks": "1"},
        {"ranks": True},
        {"ranks": 1.0},
        {"ranks": 0},
        {"family": 3},
        {"dtype": None},
        {"files": []},
        {"passes": "fuse"},
        {"source": "x"},
        {"quant": []},
        {"config": 1},
        {"family": ...},
        {"files": ...},
        {"files": {"rank0.safetensors": {"size": "40"}}},
        {"files": {"rank0.safetensors": {"size": 40, "sha256": None}}},
        {"files": {"rank0.safetensors": [40, "ab"]}},
    ],
    ids=lambda c: "-".join(f"{k}={v!r}"[:30] for k, v in c.items()),
)
def test_manifest_refuses_wrong_types(folder, change):
    _edit(folder, **change)
    with pytest.raises(UserError, match="rebuild the artifacts"):
        read_manifest(folder)


@pytest.mark.parametrize("version", [99, 2, 0, "1", None, ...])
def test_manifest_refuses_unknown_format_version(folder, version):
    _edit(folder, format_version=version)
    with pytest.raises(UserError, match="format_version"):
        read_manifest(folder)


@pytest.mark.parametrize("text", ["{", "[]", "\xff", "null"])
def test_manifest_refuses_non_json(folder, text):
    (folder / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(UserError, match="rebuild the artifacts"):
        read_manifest(folder)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a\\..\\x"])
def test_manifest_refuses_paths_outside(folder, name):
    _edit(folder, files={name: {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(UserError, match="outside the artifacts"):
        read_manifest(folder)


@pytest.mark.parametrize(
    "name,words",
    [("a\x00b", "cannot exist"), ("\ud800", "cannot exist"), ("x" * 300, "File name too long")],
    ids=["nul", "lone-surrogate", "too-long"],
)
def test_manifest_refuses_names_no_file_can_have(folder, name, words):
    """Found by the fuzzer (tests/faults): these raised ValueError or OSError from pathlib."""
    _edit(folder, files={name: {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(UserError, match=words):
        read_manifest(folder)


def test_manifest_refuses_symlink_outside(folder, tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"x")
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    _edit(folder, files={"link": {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(UserError, match="outside the artifacts"):
        read_manifest(folder)


def test_manifest_refuses_being_a_symlink_out(folder, tmp_path):
    (tmp_path / "elsewhere.json").write_bytes((folder / "manifest.json").read_bytes())
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="'manifest.json' points outside the artifacts"):
        read_manifest(folder)


def test_verify_refuses_an_unlisted_symlink_out(folder, tmp_path):
    """The runtime opens tokenizer files by name, listed or not: none may lead out."""
    m = read_manifest(folder)
    (folder / "inside.json").symlink_to(folder / "rank0.safetensors")
    artifacts.verify(folder, m)  # a link that stays inside is harmless
    (tmp_path / "elsewhere.json").write_text("{}")
    (folder / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="'tokenizer_config.json' points outside the artifacts"):
        artifacts.verify(folder, m, checksums=False)


def test_manifest_missing_folder_or_file(tmp_path):
    with pytest.raises(UserError, match="no such artifacts folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_verify_refuses_size_checksum_and_missing(folder):
    m = read_manifest(folder)
    weights = folder / "rank0.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    artifacts.verify(folder, m, checksums=False)  # size only: passes
    with pytest.raises(UserError, match="sha256"):
        artifacts.verify(folder, m)
    weights.write_bytes(data[:-4])
    with pytest.raises(UserError, match="bytes, manifest says"):
        artifacts.verify(folder, m, checksums=False)
    weights.unlink()
    with pytest.raises(UserError, match="missing"):
        artifacts.verify(folder, m)


# ---------------------------------------------------------------------------------------------
# AtomicFolder


def _siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


def test_atomic_folder_commits(tmp_path):
    dest = tmp_path / "out"
    with AtomicFolder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        assert not dest.exists()
        (tmp / "manifest.json").write_text("{}")
    assert (dest / "manifest.json").read_text() == "{}"
    assert _siblings(dest) == []


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt(), UserError("bad")])
def test_atomic_folder_leaves_nothing_when_the_body_raises(tmp_path, error):
    dest = tmp_path / "out"
    with pytest.raises(type(error)), AtomicFolder(dest) as tmp:
        (tmp / "rank0.safetensors").write_bytes(b"partial")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
        raise error
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_turns_os_errors_into_user_errors(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(UserError, match="write failed"), AtomicFolder(dest):
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_existing_artifacts(folder):
    old_manifest = (folder / "manifest.json").read_text()
    (folder / "stale.onnx").write_text("old")
    with AtomicFolder(folder) as tmp:
        # until the rename, the old artifacts stay whole under their name
        assert (folder / "manifest.json").read_text() == old_manifest
        (tmp / "manifest.json").write_text('{"new": true}')
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    assert json.loads((folder / "manifest.json").read_text()) == {"new": True}
    assert _siblings(folder) == []


def test_atomic_folder_keeps_existing_artifacts_when_the_body_raises(folder):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(RuntimeError), AtomicFolder(folder) as tmp:
        (tmp / "manifest.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _siblings(folder) == []


def test_atomic_folder_accepts_an_empty_folder(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with AtomicFolder(dest) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json"]
    assert _siblings(dest) == []


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_atomic_folder_refuses_what_is_not_artifacts(tmp_path, kind):
    dest = tmp_path / "out"
    if kind == "folder":
        dest.mkdir()
        (dest / "thesis.tex").write_text("precious")
    else:
        dest.write_text("precious")
    with pytest.raises(UserError, match="not xcompile artifacts"), AtomicFolder(dest):
        pytest.fail("the body must not run")
    if kind == "folder":
        assert [p.name for p in dest.iterdir()] == ["thesis.tex"]
        assert (dest / "thesis.tex").read_text() == "precious"
    else:
        assert dest.read_text() == "precious"
    assert _siblings(dest) == []


def test_atomic_folder_refuses_missing_parent(tmp_path):
    dest = tmp_path / "a" / "b"
    with pytest.raises(UserError, match="parent folder does not exist"), AtomicFolder(dest):
        pytest.fail("the body must not run")
    assert list(tmp_path.iterdir()) == []


def _abandon(dest: Path) -> Path:
    """The temporary folder of an AtomicFolder whose process was SIGKILLed mid-write."""
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from xcompile.artifacts import AtomicFolder\n"
        "tmp = AtomicFolder(sys.argv[1]).__enter__()\n"
        "(tmp / 'manifest.json').write_text('{}')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True)
    assert res.returncode == -9, res.stderr
    (left,) = _siblings(dest)
    return dest.parent / left


def test_atomic_folder_removes_what_a_killed_writer_left(tmp_path):
    dest = tmp_path / "out"
    left = _abandon(dest)
    assert left.name.startswith(".out.tmp-") and (left / "manifest.json").exists()
    with AtomicFolder(dest) as tmp:
        assert _siblings(dest) == [tmp.name]
        (tmp / "manifest.json").write_text("{}")
    assert _siblings(dest) == [] and (dest / "manifest.json").exists()


def test_atomic_folder_keeps_a_folder_whose_writer_holds_its_lock(tmp_path):
    """A writer this process cannot see (another pid namespace) still holds its flock."""
    import fcntl
    import os

    dest = tmp_path / "out"
    theirs = tmp_path / ".out.tmp-999999999-abc"  # a pid that runs nowhere here
    theirs.mkdir()
    lock = os.open(theirs, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with AtomicFolder(dest) as tmp:
            assert sorted(_siblings(dest)) == sorted([tmp.name, theirs.name])
    finally:
        os.close(lock)
    with AtomicFolder(dest):
        assert theirs.name not in _siblings(dest)


def test_atomic_folder_puts_back_an_original_moved_aside(folder):
    """A kill between the two renames of a filesystem without an atomic exchange."""
    before = sorted(p.name for p in folder.iterdir())
    aside = folder.parent / ".art.old-999999999-abc"
    aside.mkdir()
    folder.rename(aside / "artifacts")
    with AtomicFolder(folder) as tmp:
        assert sorted(p.name for p in folder.iterdir()) == before
        (tmp / "manifest.json").write_text("{}")
    assert _siblings(folder) == []


def test_atomic_folder_replaces_without_a_moment_of_absence(folder, monkeypatch):
    """The commit over existing artifacts is one exchange: no rename moves them aside."""
    import os

    renames = []
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a))
    with AtomicFolder(folder) as tmp:
        (tmp / "manifest.json").write_text('{"new": true}')
    assert renames == []
    assert json.loads((folder / "manifest.json").read_text()) == {"new": True}
    assert _siblings(folder) == []


def test_signals_wait_for_the_commit(tmp_path):
    import os
    import signal

    seen = []
    # Python's own Ctrl-C handler, whatever an earlier test in this process left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), artifacts._signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("the block went on")
        assert seen == ["the block went on"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
