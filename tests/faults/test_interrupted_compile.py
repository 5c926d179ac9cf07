"""Compile interrupted: SIGINT and SIGKILL at random moments of `xcompile quantize` and
`xcompile shard`. After each, no folder poses as artifacts (a manifest.json over files that do
not match it), the source and any earlier artifacts are whole, Ctrl-C leaves nothing behind,
and the rerun succeeds and leaves nothing behind (it also clears what a SIGKILL left).

The commands run in forks of a warmed-up server (tests/faults/zygote.py), so every kill lands in
compile work: half the moments are drawn over the whole command, half over its writing (from
its first change on disk, wherever it writes). Half the trials replace existing artifacts (quantize
over older FP32 artifacts; shard in place), half write a new folder.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.conftest import trials
from tests.faults.outcome import complete, posing_as_artifacts, strays, tree
from tests.faults.zygote import Zygote

SEED = int(os.environ.get("XCOMPILE_FAULTS_SEED", "20260527"))


@dataclass
class Scenario:
    """One trial's folder: `argv` run in `parent` writes `dest`; `sources` must not change;
    `old` is dest's content before, when the command replaces existing artifacts."""

    parent: Path
    argv: list[str]
    dest: str
    sources: dict[Path, dict[str, str]]
    old: dict[str, str] | None
    in_place: bool

    def is_new(self, command: str) -> bool:
        manifest = complete(self.parent / self.dest)
        if manifest is None:
            return False
        return manifest.dtype == "bf16" if command == "quantize" else manifest.ranks == 2

    def temporaries(self) -> list[str]:
        return [p for p in os.listdir(self.parent) if p.startswith(f".{self.dest}.")]

    def snapshot(self) -> set:
        """What writing changes: the entries beside dest and in it, with their sizes."""
        found = set()
        for folder in (self.parent, self.parent / self.dest):
            try:
                for e in os.scandir(folder):
                    found.add((folder.name, e.name, e.stat(follow_symlinks=False).st_size))
            except FileNotFoundError:  # not there (yet, or any more)
                continue
        return found


def scenario(command: str, parent: Path, replace: bool, zygote: Zygote) -> Scenario:
    parent.mkdir(parents=True)
    single = zygote.single  # FP32, one rank
    if command == "quantize":
        ckpt = zygote.ckpt
        if replace:
            shutil.copytree(single, parent / "art")
        argv = ["quantize", str(ckpt), "-o", "art", "--bf16"]
        old = tree(parent / "art") if replace else None
        return Scenario(parent, argv, "art", {ckpt: tree(ckpt)}, old, False)
    shutil.copytree(single, parent / "art")
    if replace:  # in place
        return Scenario(
            parent, ["shard", "art", "--ranks", "2"], "art", {}, tree(parent / "art"), True
        )
    argv = ["shard", "art", "--ranks", "2", "-o", "tp2"]
    return Scenario(parent, argv, "tp2", {parent / "art": tree(parent / "art")}, None, False)


@dataclass
class Timing:
    total: float  # seconds from fork to exit
    writing: float  # seconds from the first change on disk to the commit


_TIMINGS: dict[str, Timing] = {}


def timing(command: str, zygote: Zygote, tmp_path: Path) -> Timing:
    """One uninterrupted run, watched: how long the command takes and how long it writes."""
    if command not in _TIMINGS:
        s = scenario(command, tmp_path / "timing", False, zygote)
        before = s.snapshot()
        zygote.start(s.argv, s.parent)
        started, appeared, committed = time.monotonic(), None, None
        while (code := zygote.poll()) is None:
            if appeared is None and s.snapshot() != before:
                appeared = time.monotonic()
            if committed is None and (s.parent / s.dest / "manifest.json").exists():
                committed = time.monotonic()
            time.sleep(0.0005)
        ended = time.monotonic()
        assert code == 0 and s.is_new(command), zygote.err.read_text()
        appeared, committed = appeared or started, committed or ended
        _TIMINGS[command] = Timing(ended - started, committed - appeared)
    return _TIMINGS[command]


def interrupt(
    command: str, zygote: Zygote, s: Scenario, sig: int, delay: float, in_writing: bool
) -> tuple:
    """Run s.argv, send sig `delay` s after its start (or after its temporary folder appears);
    returns (exit code, where the signal landed: before writing / writing / after the commit /
    after the command ended)."""
    before = s.snapshot()
    pid = zygote.start(s.argv, s.parent)
    start = time.monotonic()
    if in_writing:  # from its first change on disk, wherever it writes
        while s.snapshot() == before:
            if (code := zygote.poll()) is not None:
                return code, "after"
            time.sleep(0.0005)
        start = time.monotonic()
    while time.monotonic() < start + delay:
        if (code := zygote.poll()) is not None:
            return code, "after"
        time.sleep(0.0005)
    if (code := zygote.poll()) is not None:
        return code, "after"
    writing = bool(s.temporaries()) or s.snapshot() != before
    os.kill(pid, sig)
    code = zygote.wait()
    if s.is_new(command) and not s.temporaries():
        return code, "committed"
    return code, "writing" if writing else "before"


def check_trial(command, zygote, s: Scenario, sig, code, phase) -> dict:
    """Judge one interrupted run and its rerun; returns the trial's figures and what failed."""
    problems, lost = [], 0
    stderr = zygote.err.read_text()
    expected = {0, 130} if sig == signal.SIGINT else {0, -signal.SIGKILL}
    if code not in expected:
        problems.append(f"exit code {code}: {stderr[-300:]}")
    lines = [line for line in stderr.splitlines() if line.strip()]
    if sig == signal.SIGINT and (len(lines) > 1 or "Traceback" in stderr):
        problems.append(f"not one line on stderr: {stderr[-300:]}")
    if posing := posing_as_artifacts(s.parent):
        problems.append(f"posing as artifacts: {posing}")
    for folder, before in s.sources.items():
        if tree(folder) != before:
            lost += 1
            problems.append(f"source {folder.name} changed")
    dest = s.parent / s.dest
    new = s.is_new(command)
    if s.old is not None and not new and tree(dest) != s.old:
        lost += 1
        problems.append(f"{s.dest}: neither the old artifacts nor the new ones")
    if s.old is None and dest.exists() and not new:
        problems.append(f"{s.dest} exists but is not the new artifacts")
    names = {s.dest, "art"}
    left_by_fault = strays(s.parent, names)
    leftovers = len(left_by_fault) if sig == signal.SIGINT else 0
    if leftovers:
        problems.append(f"left after Ctrl-C: {left_by_fault}")
    if not (s.in_place and new):  # an in-place shard that finished is refused a second time
        rerun, out, err = zygote.run(s.argv, s.parent)
        if rerun != 0 or not s.is_new(command):
            problems.append(f"rerun failed ({rerun}): {err[-300:]}")
    if left := strays(s.parent, names):
        leftovers += len(left)
        problems.append(f"left after the rerun: {left}")
    for folder, before in s.sources.items():
        if tree(folder) != before:
            lost += 1
            problems.append(f"source {folder.name} changed by the rerun")
    return {
        "ok": not problems,
        "lost": lost,
        "leftovers": leftovers,
        "why": f"{phase}: {'; '.join(problems)}",
        "phase": phase,
        "killed_left": len(left_by_fault),
    }


@trials(fast=2, slow=24)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("command", ["quantize", "shard"])
def test_interrupted_compile_leaves_no_false_artifacts(
    command, sig, n_trials, zygote, tmp_path, fault
):
    t = timing(command, zygote, tmp_path)
    rng = random.Random(f"{SEED}-{command}-{int(sig)}-{n_trials}")
    phases = {"before": 0, "writing": 0, "committed": 0, "after": 0}
    killed_left = 0
    record = fault(f"Compile interrupted: {signal.Signals(sig).name} during `xcompile {command}`")
    for i in range(n_trials):
        s = scenario(command, tmp_path / f"trial{i}", i % 4 in (1, 2), zygote)
        in_writing = i % 2 == 0
        delay = rng.uniform(0, t.writing if in_writing else t.total)
        code, phase = interrupt(command, zygote, s, sig, delay, in_writing)
        result = check_trial(command, zygote, s, sig, code, phase)
        phases[phase] += 1
        killed_left += result["killed_left"]
        record.trial(result["ok"], result["lost"], result["leftovers"], result["why"])
        shutil.rmtree(s.parent)
    record.note = (
        f"signal landed {phases['before']}x before writing, {phases['writing']}x while writing, "
        f"{phases['committed']}x after the commit, {phases['after']}x after the exit "
        f"(run {t.total:.2f} s, writing {t.writing:.2f} s); "
        + (
            f"the kills left {killed_left} temporary folders, each removed by the rerun"
            if sig == signal.SIGKILL
            else f"Ctrl-C left {killed_left} entries beside the output"
        )
    )
    record.check()
