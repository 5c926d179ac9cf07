"""Nobody let in: the SHM segment's name cannot be guessed, it is created exclusively (O_EXCL:
a name someone planted first, file or symlink, is refused and left untouched) with mode 0600
whatever the umask, a process of another uid can neither open nor attach to it, and nothing on
the path that reads artifacts unpickles (pickle, torch.load).

Another uid: the test runs as root, so a forked child drops to nobody (65534) with
setgid/setuid before it tries; skipped where the suite does not run as root.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import shm_left, shm_names, trials
from tests.faults.test_rank_death import HOOK

NAME = re.compile(r"/xcompile-[0-9a-f]{32}")  # 128 random bits
NOBODY = 65534


def test_segment_names_cannot_be_guessed(fault):
    from xcompile.runtime.comm import ShmComm

    record = fault("Nobody let in: SHM segment name", "ShmComm.new_name: secrets.token_hex(16)")
    names = [ShmComm.new_name() for _ in range(10_000)]
    for name in names:
        record.trial(bool(NAME.fullmatch(name)), why=name)
    assert len(set(names)) == len(names)
    # every hex digit takes every value about equally often: no fixed or counter part
    digits = [c for name in names for c in name[len("/xcompile-") :]]
    counts = [digits.count(c) for c in "0123456789abcdef"]
    assert max(counts) / min(counts) < 1.1, counts
    record.check()


def _create(name: str):
    from xcompile import _C

    return _C.ShmAllReduce(name, -1, 2, True, 1.0)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_segment_is_0600_whatever_the_umask(umask, fault):
    from xcompile.runtime.comm import ShmComm

    record = fault("Nobody let in: SHM segment created O_EXCL, mode 0600", "umask 000/022/077")
    name = ShmComm.new_name()
    old = os.umask(umask)
    try:
        creator = _create(name)
    finally:
        os.umask(old)
    try:
        st = os.stat(f"/dev/shm{name}")
        mode = stat.S_IMODE(st.st_mode)
        record.trial(mode == 0o600 and st.st_uid == os.getuid(), why=f"mode {mode:o}")
    finally:
        creator.close()
    record.trial(not os.path.exists(f"/dev/shm{name}"), leftovers=0, why="not unlinked")
    record.check()


@pytest.mark.parametrize("planted", ["file", "symlink"])
def test_a_planted_name_is_refused_and_left_alone(planted, tmp_path, fault):
    """Someone who guessed the name first: creating fails (O_EXCL), nothing of theirs changes,
    and no symlink is followed."""
    record = fault("Nobody let in: SHM segment created O_EXCL, mode 0600")
    name = f"/xcompile-{secrets.token_hex(16)}"
    path = Path(f"/dev/shm{name}")
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    if planted == "file":
        path.write_bytes(b"precious")
    else:
        path.symlink_to(target)
    planted_fd = os.open(path, os.O_RDONLY)  # the planted inode, even if its name goes
    try:
        try:
            _create(name).close()
            refused = "created it"
        except RuntimeError as e:
            refused = "already exists" in str(e) or str(e)
        kept = target.read_bytes() == b"precious" and os.pread(planted_fd, 64, 0) == b"precious"
        why = f"{planted}: {refused}; planted bytes {'kept' if kept else 'overwritten'}"
        record.trial(refused is True and kept, lost=int(not kept), why=why)
    finally:
        os.close(planted_fd)
        if path.is_symlink() or path.exists():
            path.unlink()
    record.check()


def _as_nobody(name: str) -> dict:
    """Fork; the child drops to uid/gid 65534 and tries to open and attach; returns what each
    attempt met."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls and xcompile._C, then _exit
        results = {}
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            results["uid"] = os.getuid()
            for label, flags in (("open O_RDWR", os.O_RDWR), ("open O_RDONLY", os.O_RDONLY)):
                try:
                    os.close(os.open(f"/dev/shm{name}", flags))
                    results[label] = "opened"
                except OSError as e:
                    results[label] = e.strerror
            from xcompile import _C

            for rank in (0, 1):
                try:
                    _C.ShmAllReduce(name, rank, 2, False, 0.5).close()
                    results[f"attach rank {rank}"] = "attached"
                except RuntimeError as e:
                    results[f"attach rank {rank}"] = str(e)
        except BaseException as e:
            results["error"] = repr(e)
        os.write(write, json.dumps(results).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return json.loads(answer)


@trials(fast=1, slow=10)
def test_another_uid_cannot_open_or_attach(n_trials, fault):
    if os.getuid() != 0:
        pytest.skip("dropping to another uid needs root")
    from xcompile.runtime.comm import ShmComm

    record = fault("Nobody let in: another uid opens or attaches", "forked child at uid 65534")
    for _ in range(n_trials):
        name = ShmComm.new_name()
        creator = _create(name)
        try:
            seen = _as_nobody(name)
            assert seen.get("uid") == NOBODY, seen
            for attempt, result in seen.items():
                if attempt == "uid":
                    continue
                refused = result == "Permission denied" or (
                    attempt.startswith("attach") and "Permission denied" in result
                )
                record.trial(refused, why=f"{attempt}: {result}")
            assert creator.attached() == 0  # nobody got in
        finally:
            creator.close()
    record.check()


# --- no pickle on the path that reads artifacts

PICKLE_CALLS = re.compile(r"\bpickle\b|torch\.load\b|\bnp\.load\b|numpy\.load\b|allow_pickle")


def _guarded(argv: list[str], log: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")])),
        "XCOMPILE_PICKLE_GUARD": str(log),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_pickle_guard_catches_pickle(tmp_path):
    """The guard itself: a process that unpickles is caught (else the test below proves nothing)."""
    log = tmp_path / "guard.log"
    res = _guarded(["-c", "import pickle; pickle.loads(pickle.dumps(1))"], log, tmp_path)
    assert res.returncode != 0 and "pickle.loads called while reading artifacts" in res.stderr
    assert "pickle pickle.loads" in log.read_text()
    res = _guarded(["-c", "import torch; torch.load('x')"], log, tmp_path)
    assert "torch.load called" in res.stderr


@pytest.mark.parametrize(
    "ranks", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["1-rank", "2-ranks"]
)
def test_no_pickle_on_the_artifact_path(ranks, zygote, tmp_path, fault):
    """xrun end to end under the guard: no unpickling in any of its processes, none of the
    pickle-loading libraries imported, and no runtime module it imported calls them."""
    record = fault("Nobody let in: no pickle or torch.load reading artifacts", "xrun under a guard")
    art = zygote.single if ranks == 1 else zygote.tp2
    log = tmp_path / "guard.log"
    shm = shm_names()
    res = _guarded(
        ["-m", "xcompile.runtime.cli", str(art), "-p", "hello", "-n", "4", "--json"], log, tmp_path
    )
    lines = log.read_text().splitlines() if log.exists() else []
    caught = [line for line in lines if line.startswith("pickle ")]
    modules = {m for line in lines if line.startswith("modules ") for m in line.split()[2:]}
    loaders = sorted(m for m in modules if not m.startswith("xcompile"))
    ours = sorted(m for m in modules if m.startswith("xcompile"))
    calling = []
    for module in ours:
        spec = __import__("importlib").util.find_spec(module)
        if spec and spec.origin and spec.origin.endswith(".py"):
            if PICKLE_CALLS.search(Path(spec.origin).read_text()):
                calling.append(module)
    ok = res.returncode == 0 and not caught and not loaders and not calling and len(ours) > 5
    why = f"exit {res.returncode} {res.stderr[-300:]!r}; {caught}; {loaders}; {calling}"
    record.trial(ok, leftovers=len(shm_left(shm)), why=why)
    record.note = (
        f"{len(ours)} xcompile modules imported by xrun, none naming pickle or torch.load; "
        "no pickle-loading library imported"
    )
    record.check()
