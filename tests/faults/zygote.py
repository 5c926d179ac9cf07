"""A fork server for the `xcompile` CLI, so that a kill at a random moment lands in compile work
and not in Python's imports (which take 90 % of a fresh `xcompile quantize` of a tiny model).

    python -m tests.faults.zygote SCRATCH
      warms up: makes SCRATCH/ckpt (a seeded tiny Llama checkpoint), SCRATCH/single (its FP32
      artifacts) and SCRATCH/tp2 (their 2-rank shards), which the whole fault suite starts from,
      with one thread (no thread pool exists at fork time), then prints {"ready": true}
      reads one request a line:   {"argv": [...], "cwd": DIR, "stdout": FILE, "stderr": FILE,
                                   "fsize": BYTES (optional: the child's RLIMIT_FSIZE)}
      answers when it forks:      {"pid": PID}
      and when the child ends:    {"pid": PID, "code": EXIT_CODE}  (-N: killed by signal N)
Each child runs `xcompile ARGV` exactly as the console script does (errors.run_cli), with
Python's own SIGINT handling, and leaves by os._exit with the CLI's exit code.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _warm(scratch: Path) -> None:
    """Make the suite's inputs (a seeded tiny Llama checkpoint with a long context, its FP32
    artifacts and their 2-rank shards) with the very code the children run, importing it all."""
    import torch

    torch.set_num_threads(1)  # no OpenMP pool: forking after it started could hang a child
    from xcompile.quantize import quantize
    from xcompile.shard import shard
    from xcompile.toy import make_checkpoint

    make_checkpoint("llama", scratch / "ckpt", max_position_embeddings=8192)
    quantize(scratch / "ckpt", scratch / "single", "fp32", progress=False)
    shard(scratch / "single", 2, scratch / "tp2", progress=False)


def _child(request: dict) -> None:
    from xcompile.cli import app
    from xcompile.errors import run_cli

    code = 1
    try:
        os.chdir(request["cwd"])
        for fd, name, flags in (
            (0, os.devnull, os.O_RDONLY),
            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            target = os.open(name, flags, 0o644)
            os.dup2(target, fd)
            os.close(target)
        if request.get("fsize"):  # RLIMIT_FSIZE: a write past it fails with EFBIG
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            run_cli(app, "xcompile", request["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what run_cli let through: a bug, shown as the traceback it is
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(scratch: str) -> None:
    _warm(Path(scratch))
    import xcompile.cli  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test's Ctrl-C goes to the children
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    """The test's side: start the server, fork commands, see them end."""

    def __init__(self, scratch: Path):
        """Starts the server; ready() waits for it."""
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ckpt, self.single, self.tp2 = scratch / "ckpt", scratch / "single", scratch / "tp2"
        self._buffer = b""
        self._ready = False
        self._log = open(self.logs / "zygote.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.zygote", str(scratch)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )

    def ready(self, timeout: float = 300) -> Zygote:
        if not self._ready:
            answer = self._answer(timeout)
            assert answer == {"ready": True}, answer
            self._ready = True
        return self

    def _answer(self, timeout: float | None) -> dict | None:
        """The next line from the server, or None when none came within timeout seconds.
        Reads the pipe's fd itself: a buffered reader could hold a line that select() misses."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                log = (self.logs / "zygote.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the zygote died (exit code {self.proc.poll()}):\n{log}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, fsize: int | None = None) -> int:
        """Fork `xcompile ARGV` in cwd; returns its pid (it runs until wait() sees it end)."""
        self.ready()
        self.out, self.err = self.logs / "stdout", self.logs / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "stdout": str(self.out), "stderr": str(self.err)}
        request["fsize"] = fsize
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer(60)["pid"]

    def poll(self) -> int | None:
        """The exit code of the running command when it has ended, else None (no waiting)."""
        answer = self._answer(0)
        return None if answer is None else answer["code"]

    def wait(self, timeout: float = 120) -> int:
        answer = self._answer(timeout)
        assert answer is not None, f"the command did not end within {timeout} s"
        return answer["code"]

    def run(self, argv: list[str], cwd: Path, fsize: int | None = None) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of one uninterrupted command."""
        self.start(argv, cwd, fsize)
        code = self.wait()
        return code, self.out.read_text(), self.err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


if __name__ == "__main__":
    main(sys.argv[1])
