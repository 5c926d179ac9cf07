"""What a fault left on disk: folders that pass as artifacts, data changed, stray entries."""

from __future__ import annotations

import hashlib
from pathlib import Path

from xcompile import artifacts
from xcompile.errors import UserError


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder ({} when it does not exist)."""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def complete(folder: Path) -> artifacts.Manifest | None:
    """The manifest when folder is whole artifacts (every file's size and sha256 checked),
    else None."""
    try:
        manifest = artifacts.read_manifest(folder)
        artifacts.verify(folder, manifest)
    except UserError:
        return None
    return manifest


def posing_as_artifacts(parent: Path) -> list[str]:
    """Folders under parent (hidden ones too) that hold a manifest.json but are not whole
    artifacts: what an interrupted compile must never leave."""
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.is_dir() and (p / artifacts.MANIFEST).exists() and complete(p) is None
    )


def strays(parent: Path, expected: set[str]) -> list[str]:
    """Entries of parent other than the expected ones (a temporary folder, a moved-aside
    original, a half-written file)."""
    return sorted(p.name for p in parent.iterdir() if p.name not in expected)
