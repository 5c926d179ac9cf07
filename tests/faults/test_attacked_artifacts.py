"""Artifacts attacked (tests/faults/attacks.py): every reader of artifacts (`xrun`, `xcompile
inspect`, `xcompile shard`) refuses each attack with one line and exit code 2, reads nothing
outside the folder (inotify watches the planted files), changes nothing, and leaves nothing in
/dev/shm or beside its output.

Fast: every attack on single-rank artifacts through each reader's CLI entry point in this
process (the console scripts' own `main` path), sharded ones through `inspect`. Slow: every
attack through the installed console scripts in subprocesses, sharded ones through `xrun`'s
ranks too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.attacks import ATTACKS, Attack
from tests.faults.conftest import shm_left, shm_names
from tests.faults.opened import Opened
from tests.faults.outcome import tree

READERS = {
    "xrun": ("xrun", lambda art, out: [art, "-p", "hi", "-n", "2", "--no-bind-cores"]),
    "inspect": ("xcompile", lambda art, out: ["inspect", art]),
    "shard": ("xcompile", lambda art, out: ["shard", art, "--ranks", "2", "-o", out]),
}


def readers(attack: Attack, slow: bool) -> list[str]:
    chosen = ["xrun", "inspect", "shard"] if attack.ranks == 1 else ["xrun", "inspect"]
    if attack.hashes:  # inspect checks sizes, never hashes: it reads no weights
        chosen.remove("inspect")
    if attack.ranks == 2 and not slow:  # xrun's ranks are fresh processes: slow suite only
        chosen.remove("xrun")
    return chosen


def run_in_process(prog: str, argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    from xcompile.errors import run_cli

    if prog == "xrun":
        from xcompile.runtime.cli import app

        argv = [*argv, "--threads", "1"]  # should it run after all: not on all our cores
    else:
        from xcompile.cli import app
    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        run_cli(app, prog, argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, capfd.readouterr().err


def run_script(prog: str, argv: list[str], cwd: Path) -> tuple[int, str]:
    script = Path(sys.executable).parent / prog
    res = subprocess.run(
        [str(script) if script.exists() else prog, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    return res.returncode, res.stderr


def attack_once(attack, reader, zygote, tmp_path, run) -> tuple[bool, int, int, str]:
    """Break a fresh copy, run the reader on it: (ok, data lost, leftovers, why)."""
    tag = f"{attack.name}-{reader}".replace(" ", "_").replace("/", "_")
    case, work = tmp_path / tag, tmp_path / f"{tag}-work"
    outside = case / "outside"
    for folder in (outside, work):
        folder.mkdir(parents=True)
    art = case / "art"
    shutil.copytree(zygote.single if attack.ranks == 1 else zygote.tp2, art, symlinks=True)
    attack.apply(art, outside)
    before = (tree(art), tree(outside), sorted(os.listdir(case)))
    shm = shm_names()
    prog, args = READERS[reader]
    with Opened([case, outside, *(p for p in outside.iterdir() if p.is_dir())]) as seen:
        code, stderr = run(prog, [str(a) for a in args(art, work / "out")], work)
        read_outside = [p for p in seen.names() if p not in (art, case)]
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if code != 2 or len(lines) != 1 or "Traceback" in stderr:
        problems.append(f"exit {code}, {len(lines)} lines on stderr: {stderr[-400:]!r}")
    elif missing := [w for w in attack.words if w.lower() not in lines[0].lower()]:
        problems.append(f"{missing} not in {lines[0]!r}")
    if read_outside:
        problems.append(f"read outside: {[str(p.relative_to(case)) for p in read_outside]}")
    lost = int((tree(art), tree(outside), sorted(os.listdir(case))) != before)
    if lost:
        problems.append("the artifacts or the files outside changed")
    left = sorted(os.listdir(work)) + shm_left(shm)
    if left:
        problems.append(f"left behind: {left}")
    return not problems, lost, len(left), f"{attack.name} / {reader}: {'; '.join(problems)}"


def _record(fault, kind: str, slow: bool):
    how = "console scripts in subprocesses" if slow else "CLI entry points in-process"
    return fault(f"Artifacts attacked: {kind}", f"xrun, xcompile inspect and shard ({how})")


KINDS = {
    "damaged file (truncated, tampered, missing)": lambda a: (
        "manifest" not in a.name and "entry" not in a.name and "symlink" not in a.name
    ),
    "manifest of the wrong shape or version": lambda a: a.name.startswith("manifest:"),
    "path out of the folder (../x, absolute, symlinks)": lambda a: (
        "entry" in a.name or "symlink" in a.name
    ),
}


@pytest.mark.parametrize("kind", list(KINDS), ids=["damaged", "manifest", "escape"])
def test_attack_refused_in_process(kind, zygote, tmp_path, monkeypatch, capfd, fault):
    record = _record(fault, kind, slow=False)
    for attack in filter(KINDS[kind], ATTACKS):
        for reader in readers(attack, slow=False):

            def run(prog, argv, cwd):
                monkeypatch.chdir(cwd)
                return run_in_process(prog, argv, monkeypatch, capfd)

            ok, lost, left, why = attack_once(attack, reader, zygote, tmp_path, run)
            record.trial(ok, lost, left, why)
    record.check()
    from xcompile.runtime import weights

    assert not weights._pending, "a refused load left its background weight copy behind"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS), ids=["damaged", "manifest", "escape"])
def test_attack_refused_by_console_scripts(kind, zygote, tmp_path, fault):
    record = _record(fault, kind, slow=True)
    for attack in filter(KINDS[kind], ATTACKS):
        for reader in readers(attack, slow=True):
            ok, lost, left, why = attack_once(attack, reader, zygote, tmp_path, run_script)
            record.trial(ok, lost, left, why)
    record.check()
