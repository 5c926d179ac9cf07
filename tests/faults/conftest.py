"""The fault suite's record: every case says how many trials it ran and how they ended, and the
session writes that to one JSON file that `tests/faults/table.py` turns into the README's table.

    $XCOMPILE_FAULTS_RESULTS (default build/faults/results.json):
    {"records": {"<fault> [fast|slow]": {"fault", "suite", "trials", "survived", "lost",
                                         "leftovers", "seconds", "note", "failures"}}}
Records merge across runs by (fault, suite), so the fast and the slow suite fill one file.
A case records before it asserts: a failing case leaves its failing figures in the file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def results_path() -> Path:
    return Path(
        os.environ.get("XCOMPILE_FAULTS_RESULTS") or REPO / "build" / "faults" / "results.json"
    )


@dataclass
class FaultRecord:
    """One fault's figures. survived: trials whose every check held; lost: trials after which
    data that existed before (the source, earlier artifacts) was gone or changed; leftovers:
    files or folders that stayed in /dev/shm or on disk when the case was over."""

    fault: str
    suite: str  # fast | slow
    trials: int = 0
    survived: int = 0
    lost: int = 0
    leftovers: int = 0
    seconds: float = 0.0
    note: str = ""
    failures: list[str] = field(default_factory=list)  # the first few, for the report

    def trial(self, ok: bool, lost: int = 0, leftovers: int = 0, why: str = "") -> None:
        self.trials += 1
        self.survived += bool(ok)
        self.lost += lost
        self.leftovers += leftovers
        if not ok and len(self.failures) < 5:
            self.failures.append(why[:500])

    def check(self) -> None:
        """The figures every fault must reach."""
        assert self.trials > 0, f"{self.fault}: no trial ran"
        assert (self.survived, self.lost, self.leftovers) == (self.trials, 0, 0), (
            f"{self.fault}: {self.survived}/{self.trials} survived, {self.lost} lost, "
            f"{self.leftovers} leftovers; first failures: {self.failures}"
        )


class FaultLog:
    def __init__(self):
        self.records: dict[str, FaultRecord] = {}

    def open(self, fault: str, suite: str, note: str = "") -> FaultRecord:
        key = f"{fault} [{suite}]"
        record = self.records.setdefault(key, FaultRecord(fault, suite, note=note))
        record.note = note or record.note
        return record

    def write(self) -> None:
        if not self.records:
            return
        path = results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        records = data.get("records", {})
        records.update({key: asdict(r) for key, r in self.records.items()})
        data["records"] = records
        data["written"] = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


_LOG = FaultLog()


@pytest.fixture(scope="session")
def fault_log() -> FaultLog:
    return _LOG


@pytest.fixture
def fault(fault_log, request):
    """fault(name, note) -> the FaultRecord of this case; its time is the test's wall time.
    The suite is the test's own: `slow` when marked so."""
    started = time.monotonic()
    opened: list[FaultRecord] = []
    suite = "slow" if request.node.get_closest_marker("slow") else "fast"

    def open_record(name: str, note: str = "") -> FaultRecord:
        record = fault_log.open(name, suite, note)
        opened.append(record)
        return record

    yield open_record
    for record in opened:
        record.seconds += round(time.monotonic() - started, 1)


_ZYGOTE: list = []  # started at collection when a selected case needs it, so it warms up early


def pytest_collection_modifyitems(session, config, items):
    if any("zygote" in getattr(item, "fixturenames", ()) for item in items) and not _ZYGOTE:
        _start_zygote()


def _start_zygote() -> None:
    import tempfile

    from tests.faults.zygote import Zygote

    _ZYGOTE.append(Zygote(Path(tempfile.mkdtemp(prefix="xcompile-faults-"))))


@pytest.fixture(scope="session")
def zygote():
    """The fork server (tests/faults/zygote.py) and the inputs it made: .ckpt, .single, .tp2
    (never modify them: copy)."""
    if not _ZYGOTE:
        _start_zygote()
    return _ZYGOTE[0].ready()


def pytest_sessionfinish(session, exitstatus):
    _LOG.write()
    for server in _ZYGOTE:
        import shutil

        server.close()
        shutil.rmtree(server.logs.parent, ignore_errors=True)


def trials(fast: int, slow: int):
    """Parametrize a case over its trial count: `fast` by default, `slow` under -m slow."""
    return pytest.mark.parametrize(
        "n_trials",
        [pytest.param(fast, id="fast"), pytest.param(slow, id="slow", marks=pytest.mark.slow)],
    )


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def shm_left(before: set[str], expected_gone: set[str] = frozenset(), wait: float = 10) -> list:
    """Entries of /dev/shm that are new since `before` and stay for `wait` seconds, and any of
    `expected_gone` still there. A segment of someone else's run on this machine lives only
    while its ranks start; a leak stays."""
    deadline = time.monotonic() + wait
    while True:
        now = shm_names()
        left = (now - before) | (set(expected_gone) & now)
        if not left or time.monotonic() > deadline:
            return sorted(left)
        if set(expected_gone) & now:  # ours: no grace
            return sorted(left)
        time.sleep(0.2)
