"""Disk full during compile: `xcompile quantize` and `xcompile shard` writing into a tmpfs of a
few KiB to almost the whole output's size (so the failure hits each file in turn: tokenizer
copies, weights, graph, manifest), and under an RLIMIT_FSIZE (EFBIG instead of ENOSPC, for
machines where mounting a tmpfs is not allowed). Each run must print one line, exit 2, and leave
the disk as empty as it found it; the source stays whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults.conftest import trials
from tests.faults.outcome import tree
from tests.faults.zygote import Zygote


def mount_tmpfs(where: Path, kib: int) -> bool:
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", str(where)],
        capture_output=True,
    )
    return res.returncode == 0


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=True)


def used_blocks(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_blocks - st.f_bfree


def command(name: str, zygote: Zygote, disk: Path) -> list[str]:
    if name == "quantize":
        return ["quantize", str(zygote.ckpt), "-o", str(disk / "art"), "--fp32"]
    return ["shard", str(zygote.single), "--ranks", "2", "-o", str(disk / "tp2")]


def judge(code: int, stderr: str, disk: Path) -> tuple[bool, int, str]:
    """(one clean line and exit 2, entries left on the disk, why not)"""
    lines = [line for line in stderr.splitlines() if line.strip()]
    left = sorted(os.listdir(disk))
    clean = (
        code == 2
        and len(lines) == 1
        and "Traceback" not in stderr
        and ("write failed" in lines[0] or "cannot write" in lines[0])
    )
    return clean, len(left), f"exit {code}, stderr {stderr[-300:]!r}, left {left}"


@trials(fast=2, slow=8)
@pytest.mark.parametrize("name", ["quantize", "shard"])
def test_disk_full_is_one_line_and_leaves_nothing(name, n_trials, zygote, tmp_path, fault):
    output = zygote.single if name == "quantize" else zygote.tp2
    total = sum(p.stat().st_size for p in output.iterdir())  # what the command writes
    sources = {zygote.ckpt: tree(zygote.ckpt), zygote.single: tree(zygote.single)}
    fractions = [0.02, 0.6, 0.3, 0.9, 0.97, 0.1, 0.995, 0.8][:n_trials]
    mechanisms = set()
    record = fault(f"Disk full during `xcompile {name}`")
    for i, fraction in enumerate(fractions):
        limit = max(4096, int(total * fraction))
        disk = tmp_path / f"disk{i}"
        if mount_tmpfs(disk, limit // 1024):
            mechanisms.add("tmpfs")
            try:
                code, _, err = zygote.run(command(name, zygote, disk), tmp_path)
                ok, left, why = judge(code, err, disk)
                if used_blocks(disk) != 0:
                    ok, why = False, f"{why}; {used_blocks(disk)} blocks still used"
            finally:
                unmount(disk)
        else:  # no mount allowed here: a file-size limit instead (ENOSPC's sibling, EFBIG)
            mechanisms.add("RLIMIT_FSIZE")
            disk.mkdir(exist_ok=True)
            limit = max(4096, int(max(p.stat().st_size for p in output.iterdir()) * fraction))
            code, _, err = zygote.run(command(name, zygote, disk), tmp_path, fsize=limit)
            ok, left, why = judge(code, err, disk)
        lost = sum(tree(folder) != before for folder, before in sources.items())
        record.trial(ok and not left and not lost, lost, left, f"{fraction:.0%} of {total}: {why}")
        shutil.rmtree(disk)
    largest = max(p.stat().st_size for p in output.iterdir())  # the limit is per file
    for i, fraction in enumerate(fractions[: max(1, n_trials // 2)]):  # EFBIG too, always
        disk = tmp_path / f"fsize{i}"
        disk.mkdir()
        limit = max(4096, int(largest * fraction))
        code, _, err = zygote.run(command(name, zygote, disk), tmp_path, fsize=limit)
        ok, left, why = judge(code, err, disk)
        lost = sum(tree(folder) != before for folder, before in sources.items())
        record.trial(ok and not left and not lost, lost, left, f"fsize {limit}: {why}")
        mechanisms.add("RLIMIT_FSIZE")
    record.note = (
        f"output {total / 1e3:.0f} kB; room for {min(fractions):.0%} to {max(fractions):.1%} of "
        f"it (of its largest file under RLIMIT_FSIZE), by {' and '.join(sorted(mechanisms))}"
    )
    record.check()
