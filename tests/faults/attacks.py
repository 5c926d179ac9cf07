"""The ways artifacts get broken or turned against their reader, each as a function that breaks a
copy: damaged files (truncated, tampered, missing), a manifest of the wrong shape, and paths
that lead out of the folder. Every attack on paths plants real files outside, with the right
size and sha256, so a reader without the protection would read them and carry on.

    attack(art, outside) -> None    art: the copy to break; outside: a folder beside it
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Attack:
    name: str
    ranks: int  # which artifacts it breaks: 1 (single) or 2 (sharded)
    words: tuple[str, ...]  # what the refusal must name
    apply: Callable[[Path, Path], None]
    hashes: bool = False  # only a reader that checks sha256 can see it (not `inspect`)


def _edit_manifest(art: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((art / "manifest.json").read_text())
    change(data)
    (art / "manifest.json").write_text(json.dumps(data))


def _set(**values) -> Callable[[Path, Path], None]:
    def apply(art: Path, outside: Path) -> None:
        _edit_manifest(art, lambda m: m.update(values))

    return apply


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _truncate(name: str):
    def apply(art: Path, outside: Path) -> None:
        os.truncate(art / name, (art / name).stat().st_size - 8)

    return apply


def _tamper(name: str):
    def apply(art: Path, outside: Path) -> None:
        with open(art / name, "r+b") as f:
            f.seek((art / name).stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))

    return apply


def _missing(name: str):
    return lambda art, outside: (art / name).unlink()


def _listed(name_of: Callable[[Path, Path], str], planted: Callable[[Path, Path], Path]):
    """A manifest entry named name_of(art, outside) for a real file planted outside."""

    def apply(art: Path, outside: Path) -> None:
        target = planted(art, outside)
        target.write_bytes((art / "tokenizer.json").read_bytes())
        _edit_manifest(art, lambda m: m["files"].update({name_of(art, outside): _entry(target)}))

    return apply


def _symlinked_entry(art: Path, outside: Path) -> None:
    """tokenizer.json, listed with its own sha256, turned into a link to an identical file."""
    shutil.copyfile(art / "tokenizer.json", outside / "tokenizer.json")
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(outside / "tokenizer.json")


def _symlinked_folder(art: Path, outside: Path) -> None:
    (outside / "dir").mkdir()
    shutil.copyfile(art / "tokenizer.json", outside / "dir" / "tokenizer.json")
    (art / "sub").symlink_to(outside / "dir")
    entry = _entry(outside / "dir" / "tokenizer.json")
    _edit_manifest(art, lambda m: m["files"].update({"sub/tokenizer.json": entry}))


def _unlisted_symlink(art: Path, outside: Path) -> None:
    """tokenizer_config.json dropped from the manifest and turned into a link out: a reader
    that opens what it finds by name would follow it."""
    shutil.copyfile(art / "tokenizer_config.json", outside / "tokenizer_config.json")
    (art / "tokenizer_config.json").unlink()
    (art / "tokenizer_config.json").symlink_to(outside / "tokenizer_config.json")
    _edit_manifest(art, lambda m: m["files"].pop("tokenizer_config.json"))


def _symlinked_manifest(art: Path, outside: Path) -> None:
    shutil.copyfile(art / "manifest.json", outside / "manifest.json")
    (art / "manifest.json").unlink()
    (art / "manifest.json").symlink_to(outside / "manifest.json")


OUTSIDE = ("outside the artifacts", "rebuild")
ATTACKS = [
    Attack("weights truncated", 1, ("rank0.safetensors", "bytes"), _truncate("rank0.safetensors")),
    Attack(
        "weights tampered (1 bit)",
        1,
        ("rank0.safetensors", "sha256"),
        _tamper("rank0.safetensors"),
        hashes=True,
    ),
    Attack("weights missing", 1, ("rank0.safetensors", "missing"), _missing("rank0.safetensors")),
    Attack("graph missing", 1, ("model.onnx", "missing"), _missing("model.onnx")),
    Attack("shard 1 truncated", 2, ("rank1.safetensors", "bytes"), _truncate("rank1.safetensors")),
    Attack(
        "shard 1 tampered (1 bit)",
        2,
        ("rank1.safetensors", "sha256"),
        _tamper("rank1.safetensors"),
        hashes=True,
    ),
    Attack("shard 1 missing", 2, ("rank1.safetensors", "missing"), _missing("rank1.safetensors")),
    Attack("manifest: ranks is a string", 1, ("'ranks'", "wrong type"), _set(ranks="1")),
    Attack("manifest: ranks is true", 1, ("'ranks'", "wrong type"), _set(ranks=True)),
    Attack("manifest: files is a list", 1, ("'files'", "wrong type"), _set(files=[])),
    Attack(
        "manifest: size is a string",
        1,
        ("rank0.safetensors", "malformed"),
        lambda art, o: _edit_manifest(
            art, lambda m: m["files"]["rank0.safetensors"].update(size="1")
        ),
    ),
    Attack("manifest: unknown key", 1, ("unknown keys", "signature"), _set(signature="x")),
    Attack("manifest: format_version 2", 1, ("format_version 2",), _set(format_version=2)),
    Attack(
        "manifest: format_version '1'", 1, ("format_version", "integer"), _set(format_version="1")
    ),
    Attack(
        "manifest: not JSON",
        1,
        ("manifest.json", "not JSON"),
        lambda art, o: (art / "manifest.json").write_bytes(b'{"format_version": 1, '),
    ),
    Attack(
        "file entry ../x",
        1,
        ("'../x'", *OUTSIDE),
        _listed(lambda art, o: "../x", lambda art, o: art.parent / "x"),
    ),
    Attack(
        "file entry with an absolute path",
        1,
        OUTSIDE,
        _listed(lambda art, o: str(o / "secret"), lambda art, o: o / "secret"),
    ),
    Attack("file entry is a symlink out", 1, ("tokenizer.json", *OUTSIDE), _symlinked_entry),
    Attack(
        "file entry through a symlinked folder",
        1,
        ("sub/tokenizer.json", *OUTSIDE),
        _symlinked_folder,
    ),
    Attack(
        "unlisted file is a symlink out",
        1,
        ("tokenizer_config.json", *OUTSIDE),
        _unlisted_symlink,
    ),
    Attack("manifest.json is a symlink out", 1, ("manifest.json", *OUTSIDE), _symlinked_manifest),
]
