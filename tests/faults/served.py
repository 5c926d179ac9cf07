"""`xrun ARTIFACTS --serve` as the fault suite drives it: a subprocess in its own process group
(the server, and under TP its launcher and ranks), its stderr lines with the time each came, and
a plain HTTP client (stdlib http.client: nothing between the test and the server's bytes).

    with Serving(art, work, slots=8) as server:   # waits for the ready line
        server.pid, server.host, server.port, server.ranks() -> {rank: pid}
        status, body = server.get("/health")
        stream = server.stream("/v1/completions", {...})   # status, then events one by one
The exit leaves nothing behind: Ctrl-C (SIGINT to the group), then SIGKILL after 30 s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import process_group as group
from tests.faults.test_rank_death import children

READY = re.compile(r"xrun: serving (\S+) on http://([^/:]+):(\d+)/v1 \((\d+) slots, (\d+) rank")


def mapped_segments(pids: list[int]) -> set[str]:
    """Names of the /dev/shm entries these processes have mapped."""
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].split()[0])
    return names


def unclaimed(names: set[str]) -> set[str]:
    """Those of names that still exist in /dev/shm and that no live process has mapped: what a
    run left behind (a segment another run on this machine uses now is mapped by it)."""
    present = {n for n in names if os.path.exists(f"/dev/shm/{n}")}
    if present:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        present -= mapped_segments(pids)
    return present


def rss_kib(pid: int) -> int:
    """VmRSS of pid in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket pid listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        for row in rows:
            if row[3] == "0A" and row[9] in inodes:  # state 0A: LISTEN
                hex_address, hex_port = row[1].split(":")
                raw = bytes.fromhex(hex_address)
                # /proc prints the address as host-order 32-bit words
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return found


class Stream:
    """One request's response read as it comes: `status`, then `events()` (the parsed JSON of
    each `data:` line, the string "[DONE]" for the end); close() hangs up at once."""

    def __init__(self, host: str, port: int, path: str, body: dict, timeout: float):
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.conn.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        self.sock = self.conn.sock  # the response may take it over; close() shuts it anyway
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.body = None if self.status == 200 else json.loads(self.response.read() or b"null")

    def events(self):
        while True:
            line = self.response.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                data = line[6:].strip()
                yield "[DONE]" if data == b"[DONE]" else json.loads(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # FIN now, whoever else holds the socket
        self.response.close()
        self.conn.close()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Serving:
    def __init__(self, art: Path, work: Path, slots: int, extra: list[str] = (), env=None):
        self.art, self.work, self.slots = art, work, slots
        self.lines: list[tuple[float, str]] = []  # (time.monotonic(), stderr line)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xcompile.runtime.cli", str(art), "--serve", "--port", "0"]
            + ["--slots", str(slots), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=work,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
            start_new_session=True,  # its own group: the server, its launcher and ranks
            # Ctrl-C as at a terminal, even when this test runs from a shell's background job
            # (which starts everything with SIGINT ignored, and a server that ignores SIGINT
            # shuts down gracefully with exit 0 instead of 130)
            preexec_fn=_default_sigint,
        )
        self.pid = self.proc.pid
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.decode(errors="replace")))
            if READY.search(self.lines[-1][1]):
                self._ready.set()

    def __enter__(self) -> Serving:
        deadline = time.monotonic() + 240
        while not self._ready.wait(0.2):
            assert self.proc.poll() is None, f"xrun --serve exited {self.proc.returncode}: {self}"
            assert time.monotonic() < deadline, f"no ready line in 240 s: {self}"
        ready = next(READY.search(line) for _, line in self.lines if READY.search(line))
        self.host, self.port = ready.group(2), int(ready.group(3))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __str__(self) -> str:
        return "".join(line for _, line in self.lines)[-3000:]

    def ranks(self) -> dict[int, int]:
        """rank -> pid (TP: the launcher's children; single-rank: {})"""
        return {
            int(cmd[cmd.index("--rank") + 1]): pid
            for pid, cmd in children(self.pid).items()
            if "--rank" in cmd
        }

    def stderr_after(self, since: float) -> list[str]:
        """The non-empty stderr lines that came after `since` (once the pipe has closed)."""
        self._reader.join(timeout=10)
        return [line.strip() for at, line in self.lines if at >= since and line.strip()]

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(
                "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def stream(self, path: str, body: dict, timeout: float = 60) -> Stream:
        return Stream(self.host, self.port, path, {**body, "stream": True}, timeout)

    def idle(self, timeout: float) -> int:
        """/health's busy slots once none is busy, or as it stands after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.get("/health")[1]["busy"]
            if busy == 0 or time.monotonic() > deadline:
                return busy
            time.sleep(0.02)

    def stop(self) -> None:
        """Ctrl-C to the group (as a user's), SIGKILL when still there after 30 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in group(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)
        self.proc.stderr.close()
