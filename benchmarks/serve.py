"""Throughput of `xrun --serve` under 1, 2, 4 and 8 concurrent streaming clients: total tokens/s,
per-client ms/token, and the forward steps/s behind them with the weight bytes they read, beside
the machine's read bandwidth, all measured in this one run (the shared host swings from one
minute to the next, so the levels alternate over --rounds and each keeps its best round).

    python benchmarks/serve.py [ARTIFACTS] [--clients 1 2 4 8] [--tokens 64] [--rounds 1]
                               [--slots 8] [--threads N]
    python benchmarks/serve.py --toy 1b --dtypes int8    # issue 17's figure: the 1.1B INT8

Without ARTIFACTS it compiles the toy llama (--toy tiny or 1b, to --dtypes, default int8) into
--work once and serves that (benchmarks/toy_artifacts.py). The server runs in its own process (`xrun
ARTIFACTS --serve --port 0`); each client is a thread here that streams one completion of
--tokens tokens after the same short prompt (same greedy text, so every client runs as long),
over plain HTTP server-sent events: a client as light as can be, since it shares the CPUs with
the server. All clients of a level start together at a barrier. Continuous batching reads the
weights once per step for all of them, so total tokens/s should grow almost with the clients
while a step stays bound by memory: the target (issue 17) is 4 clients >= 3 x the tokens/s of
one, on the 1.1B INT8.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import read_bandwidth  # noqa: E402
from decode import weight_bytes_per_token  # noqa: E402
from toy_artifacts import add_arguments, artifacts_from  # noqa: E402

PROMPT = "Once upon a time there was a small village by the sea"
READY = re.compile(r"xrun: serving \S+ on http://([^/:]+):(\d+)/v1")
TARGET = 3.0  # 4 clients' total tokens/s over one client's (issue 17)


@dataclass
class Stream:
    """One client's completion: when it was sent, its first and last token, how many tokens."""

    sent: float
    first: float
    last: float
    tokens: int

    @property
    def ms_per_token(self) -> float:
        """Request sent to last token, per token: what the client waited for each. (Not from the
        first text event: the server holds back text until it is printable, and the random
        test model's tokens often are not, so events come in bursts.)"""
        return (self.last - self.sent) * 1e3 / max(self.tokens, 1)


@dataclass
class Level:
    clients: int
    streams: list[Stream]
    seconds: float  # first request sent .. last token received
    steps: int  # the engine's forward passes meanwhile

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.streams) / self.seconds

    @property
    def ms_per_token(self) -> float:
        return sum(s.ms_per_token for s in self.streams) / len(self.streams)

    @property
    def first_text_ms(self) -> float:
        """From sending to the first event with text. The server sends an event only when text is
        ready, and the toy models' tokens may decode to nothing for most of a stream (random ids:
        pieces of UTF-8 characters), so on them this is nearer the whole stream's time than the
        first token's (benchmarks/ttft.py measures that); nan: no text at all."""
        return sum(s.first - s.sent for s in self.streams) * 1e3 / len(self.streams)


class Server:
    """`xrun ARTIFACTS --serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, artifacts: Path, slots: int, threads: int | None):
        cmd = [sys.executable, "-m", "xcompile.runtime.cli", str(artifacts), "--serve"]
        cmd += ["--port", "0", "--slots", str(slots), "--model-name", "bench"]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for line in self.proc.stderr:  # model loading: up to minutes for the 1.1B
            found = READY.search(line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                break
            sys.stderr.write(line)
        else:
            raise SystemExit(f"xrun --serve exited ({self.proc.wait()}) before it was ready")
        threading.Thread(target=self._relay_stderr, daemon=True).start()

    def _relay_stderr(self) -> None:
        """Its later lines (an error, say) go on to ours; a full pipe would stall it."""
        for line in self.proc.stderr:
            sys.stderr.write(line)

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def idle(self) -> dict:
        """/health once no request holds a slot."""
        while (health := self.get("/health"))["busy"]:
            time.sleep(0.01)
        return health

    def stream(self, tokens: int) -> Stream:
        """One streamed completion, read as it comes (server-sent events, one per piece)."""
        body = {
            "prompt": PROMPT,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            sent = time.perf_counter()
            conn.request("POST", "/v1/completions", json.dumps(body).encode())
            response = conn.getresponse()
            if response.status != 200:
                raise SystemExit(f"HTTP {response.status}: {response.read().decode()}")
            first = last = None
            count = 0
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                last = time.perf_counter()  # any event: the toy 1.1B's tokens may decode to ""
                if event.get("usage"):
                    count = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    first = first or last
            return Stream(sent, first or float("nan"), last or sent, count)  # nan: no text
        finally:
            conn.close()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_level(server: Server, clients: int, tokens: int) -> Level:
    """`clients` streams started together; their figures once all have finished."""
    before = server.idle()["steps"]
    barrier = threading.Barrier(clients)
    streams: list[Stream | None] = [None] * clients

    def client(i: int) -> None:
        barrier.wait()
        streams[i] = server.stream(tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(s is None for s in streams):
        raise SystemExit(f"a client of {clients} failed (see above)")
    steps = server.idle()["steps"] - before
    seconds = max(s.last for s in streams) - min(s.sent for s in streams)
    return Level(clients, streams, seconds, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, ["int8"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per client")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the levels; best kept")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="the server's (default: all)")
    args = parser.parse_args()
    if max(args.clients) > args.slots:
        parser.error(f"--clients {max(args.clients)} > --slots {args.slots}: they would get 429")
    for artifacts in artifacts_from(args):
        serve(artifacts, args)


def serve(artifacts: Path, args: argparse.Namespace) -> None:
    """Every level of clients on one server of `artifacts`; the table."""
    weights = weight_bytes_per_token(artifacts)
    server = Server(artifacts, args.slots, args.threads)
    try:
        server.stream(4)  # warm up: the first forward passes page things in
        bandwidth = [read_bandwidth(args.threads)]  # the server is idle meanwhile
        best: dict[int, Level] = {}
        for _ in range(args.rounds):
            for clients in args.clients:
                level = run_level(server, clients, args.tokens)
                if clients not in best or level.tokens_per_s > best[clients].tokens_per_s:
                    best[clients] = level
        bandwidth.append(read_bandwidth(args.threads))
    finally:
        server.stop()

    print(f"{artifacts}: {args.tokens} tokens per client, {args.slots} slots")
    print(
        f"read bandwidth: {max(bandwidth):.1f} GB/s (before {bandwidth[0]:.1f}, after "
        f"{bandwidth[1]:.1f}); weights read per forward step: {weights / 1e6:.1f} MB"
    )
    print(
        f"{'clients':>7} {'total tok/s':>12} {'ms/token/client':>16} {'first text ms':>15} "
        f"{'steps/s':>8} {'tokens/step':>12} {'weights GB/s':>13}"
    )
    for clients, level in best.items():
        steps_per_s = level.steps / level.seconds
        tokens = sum(s.tokens for s in level.streams)
        print(
            f"{clients:>7} {level.tokens_per_s:>12.2f} {level.ms_per_token:>16.1f} "
            f"{level.first_text_ms:>15.0f} {steps_per_s:>8.2f} "
            f"{tokens / max(level.steps, 1):>12.2f} {steps_per_s * weights / 1e9:>13.2f}"
        )
    if 1 in best and 4 in best:
        ratio = best[4].tokens_per_s / best[1].tokens_per_s
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"4 clients / 1 client: {ratio:.2f}x total tokens/s (target >= {TARGET}x: {verdict})")


if __name__ == "__main__":
    main()
