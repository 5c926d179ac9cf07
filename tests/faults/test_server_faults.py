"""`xrun --serve` under faults: a rank killed while requests stream, 16 clients sending 1,000
requests (some hanging up mid-stream), and where it listens.

A rank dies: the server does not restart its ranks; it answers 503 while it goes down and exits
non-zero, for a supervisor (systemd, Kubernetes) to start it again. Under TP the exit code is the
launcher's for a killed rank (1: launch._watch names it); a single-rank server whose engine
fails exits 3 (server.serve).

Under load: every request either completes (a finish_reason; streams end with [DONE]), is left
by its client (the slot comes back), or is refused with 429 (retried by the client, refused
when every try was); afterwards no slot is busy, every slot gives the greedy text it gave
before the load, and the server's RSS is within 5 % of what it was after a warm-up.
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.conftest import shm_names, trials
from tests.faults.outcome import tree
from tests.faults.served import (
    Serving,
    group,
    listening,
    mapped_segments,
    rss_kib,
    unclaimed,
)
from tests.faults.test_rank_death import SEED

PROMPT = "The quick brown fox jumps over the lazy dog and then"
PROMPTS = [PROMPT, "hello", "Once upon a time", " ".join(f"word{i}" for i in range(40))]
MESSAGES = [{"role": "user", "content": "What colour is the sky on a clear day?"}]
TP_KILLED_EXIT = 1  # launch._watch: a rank was killed, the others stopped


# ---- a rank dies ---------------------------------------------------------------------------
def _read_to_end(stream) -> str:
    """How a stream cut by the fault ended: "error event", "closed", or what went wrong."""
    try:
        events = list(stream.events())
    except TimeoutError:
        return "hung (no byte for 10 s)"
    except (OSError, http.client.IncompleteRead):  # reset, or the chunked body cut short
        return "closed"
    finally:
        stream.close()
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if errors and events[-1] == "[DONE]":
        return "error event"
    if events and events[-1] == "[DONE]":
        return "finished before the kill"  # the kill came too late: not this fault's trial
    return "closed"


def _watch_going_down(server: Serving, killed: float) -> tuple[list, float | None]:
    """Polls /health and a new completion until the process exits (or 10 s) -> the answers
    ((seconds since the kill, health status or "refused", completion status or "refused")),
    and the seconds from the kill to the exit."""
    answers = []
    while server.proc.poll() is None and time.monotonic() < killed + 10:
        at = time.monotonic() - killed
        try:
            health = server.get("/health", timeout=2)[0]
        except OSError:
            health = "refused"
        try:
            completion = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, 2)[0]
        except OSError:
            completion = "refused"
        answers.append((round(at, 2), health, completion))
        time.sleep(0.05)
    try:
        server.proc.wait(timeout=max(0.1, killed + 30 - time.monotonic()))
    except Exception:  # noqa: BLE001 (TimeoutExpired: the stop() of the with block kills it)
        return answers, None
    return answers, time.monotonic() - killed


@trials(fast=1, slow=5)
def test_rank_killed_while_serving_the_server_answers_503_and_exits(
    n_trials, zygote, tmp_path, fault
):
    rng = random.Random(f"{SEED}-serve-rank-{n_trials}")
    record = fault(
        "Server: a rank dies (SIGKILL) mid-stream",
        "xrun --serve, 2 ranks, rank 1 killed after 1-20 streamed tokens of 1 or 2 streams",
    )
    before = tree(zygote.tp2)
    exits, windows = [], []
    for i in range(n_trials):
        work = tmp_path / f"run{i}"
        work.mkdir()
        shm = shm_names()
        problems: list[str] = []
        with Serving(zygote.tp2, work, slots=2) as server:
            ranks = server.ranks()
            segments = mapped_segments(group(server.pid))  # its ranks' allreduce
            body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0}
            streams = [
                server.stream("/v1/completions", body, timeout=10)
                for _ in range(rng.choice([1, 2]))
            ]
            events = streams[0].events()
            for _ in range(rng.randint(1, 20)):
                next(events)
            time.sleep(rng.uniform(0, 0.02))
            os.kill(ranks[1], signal.SIGKILL)
            killed = time.monotonic()
            ends = [_read_to_end(s) for s in streams]
            answers, exited = _watch_going_down(server, killed)
            code = server.proc.returncode
        stderr = server.stderr_after(killed)
        if any(end not in ("error event", "closed") for end in ends):
            problems.append(f"streams ended {ends}")
        if any(h not in (503, "refused") or c not in (503, "refused") for _, h, c in answers):
            problems.append(f"answers while going down (s, /health, completion): {answers}")
        if exited is None or exited >= 5.0 or code != TP_KILLED_EXIT:
            problems.append(f"exit code {code} after {exited} s")
        named = [line for line in stderr if "rank 1" in line and "died" in line]
        if not named or any(not line.startswith("xrun: ") for line in stderr):
            problems.append(f"stderr {stderr}")
        time.sleep(0.2)  # the group's last process is reaped by now
        alive = group(server.pid)
        left = sorted(unclaimed(segments | (shm_names() - shm)))
        left += sorted(p.name for p in work.iterdir())  # nothing written where it ran
        if not segments:
            problems.append("its ranks mapped no segment: nothing to look for in /dev/shm")
        if alive or left:
            problems.append(f"alive {alive}, left {left} (its segments: {segments})")
        windows.append(max((at for at, h, _ in answers if h == 503), default=0.0))
        exits.append(exited or float("nan"))
        lost = int(tree(zygote.tp2) != before)
        record.trial(not problems, lost, len(alive) + len(left), "; ".join(problems))
    record.note += (
        f"; /health said 503 for {min(windows):.1f}-{max(windows):.1f} s, xrun exited "
        f"{TP_KILLED_EXIT} in {min(exits):.1f}-{max(exits):.1f} s"
    )
    record.check()


# ---- under load ----------------------------------------------------------------------------
CLIENTS, SLOTS, WARM_UP = 16, 8, 64
KINDS = ["complete"] * 3 + ["stream"] * 3 + ["chat", "chat stream"] + ["leave"] * 2
TRIES = 200  # a request refused (429) this many times in a row counts as refused
DONE = {"completed", "left", "refused"}


@pytest.fixture(scope="module")
def single_server(zygote, tmp_path_factory):
    """One single-rank server for the cases below (each measures from its own start)."""
    work = tmp_path_factory.mktemp("serve-single")
    with Serving(zygote.single, work, slots=SLOTS) as server:
        yield server
    assert server.proc.returncode == 130, f"Ctrl-C: exit {server.proc.returncode}: {server}"
    assert not group(server.pid)


def _finished(kind: str, body: dict, max_tokens: int) -> str:
    """ "completed" when a non-streamed answer is whole, else what is wrong with it."""
    choice = body["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    if choice["finish_reason"] not in ("stop", "length") or not isinstance(text, str):
        return f"{kind}: {choice}"
    if not 1 <= body["usage"]["completion_tokens"] <= max_tokens:
        return f"{kind}: usage {body['usage']}"
    return "completed"


def _streamed(kind: str, stream, leave_after: int | None) -> str:
    """Reads a 200 stream: "left" when the client hung up after leave_after events,
    "completed" when it ended with one finish_reason and [DONE], else what went wrong."""
    events = []
    try:
        for event in stream.events():
            events.append(event)
            if isinstance(event, dict) and "error" in event:
                return f"{kind}: {event}"
            if leave_after is not None and len(events) == leave_after and event != "[DONE]":
                return "left"
    finally:
        stream.close()
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    if events[-1:] != ["[DONE]"] or finishes not in (["stop"], ["length"]):
        return f"{kind}: ended {events[-2:]}"
    return "completed"


def _send(server: Serving, kind: str, body: dict, leave_after: int | None) -> str:
    """One try -> "completed", "left", "429", or what went wrong."""
    chat = kind.startswith("chat")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        if kind in ("complete", "chat"):
            status, answer = server.post(path, body)
        else:
            stream = server.stream(path, body)
            status, answer = stream.status, stream.body
            if status == 200:
                return _streamed(kind, stream, leave_after)
            stream.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        return f"{kind}: {e!r}"
    if status == 429 and answer["error"]["code"] == "slots_full":
        return "429"
    if status != 200:
        return f"{kind}: {status} {answer}"
    return _finished(kind, answer, body["max_tokens"])


def _request(server: Serving, i: int) -> tuple[str, int]:
    """Request number i (its kind, prompt and length drawn from i) -> (outcome, 429s)."""
    rng = random.Random(f"{SEED}-load-{i}")
    kind = rng.choice(KINDS)
    body = {"messages": MESSAGES} if kind.startswith("chat") else {"prompt": rng.choice(PROMPTS)}
    leave_after = rng.randint(1, 3) if kind == "leave" else None
    body["max_tokens"] = 200 if leave_after else rng.randint(4, 8)
    body["temperature"], body["seed"] = rng.choice([0, 1.0]), i
    for tries in range(TRIES):
        outcome = _send(server, "stream" if kind == "leave" else kind, body, leave_after)
        if outcome != "429":
            return outcome, tries
        time.sleep(rng.uniform(0.005, 0.03))
    return "refused", TRIES


def _load(server: Serving, first: int, n: int) -> list[tuple[str, int]]:
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(lambda i: _request(server, i), range(first, first + n)))


def _greedy_on_every_slot(server: Serving) -> list[str | None]:
    """PROMPT's greedy text from each slot in turn (None where the request was not answered):
    one request at a time takes the first free slot and gives it back at the end of the list,
    so SLOTS of them visit every slot."""
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    texts = []
    for _ in range(SLOTS):
        status, answer = server.post("/v1/completions", body)
        texts.append(answer["choices"][0]["text"] if status == 200 else None)
    return texts


def _every_slot_at_once(server: Serving) -> list[str]:
    """SLOTS streams held open at once, one more refused, all freed when they hang up ->
    what went otherwise."""
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0}
    streams = [server.stream("/v1/completions", body) for _ in range(SLOTS)]
    problems = [f"stream {s.status}" for s in streams if s.status != 200]
    for s in streams:
        if s.status == 200 and not isinstance(next(s.events()), dict):
            problems.append("no first event")
    busy = server.get("/health")[1]["busy"]
    extra = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 4})[0]
    for s in streams:
        s.close()
    if busy != SLOTS or extra != 429:
        problems.append(f"{busy} busy of {SLOTS}, one more got {extra}")
    if left := server.idle(5):
        problems.append(f"{left} slots busy 5 s after every client hung up")
    return problems


@trials(fast=100, slow=1000)
def test_sixteen_clients_leave_no_slot_memory_or_cache_behind(n_trials, single_server, fault):
    server = single_server
    record = fault(
        "Server under load: 16 clients, some hanging up mid-stream",
        f"{SLOTS} slots; completions and chat, streamed or not, 4-8 tokens; 20 % leave after "
        "1-3 events; a 429 is retried; the last trial: what the load left behind",
    )
    greedy = _greedy_on_every_slot(server)
    _load(server, 10**6, WARM_UP)  # RSS is measured from here: the first requests' imports
    server.idle(5)
    rss_before = rss_kib(server.pid)
    started = time.monotonic()
    outcomes = _load(server, 0, n_trials)
    took = time.monotonic() - started
    leaked = server.idle(5)
    rss_after = rss_kib(server.pid)
    greedy_after = _greedy_on_every_slot(server)
    all_at_once = _every_slot_at_once(server)
    counts = {k: sum(o == k for o, _ in outcomes) for k in sorted(DONE)}
    for outcome, _ in outcomes:
        record.trial(outcome in DONE, why=outcome)
    # one more trial: what the load left behind
    growth = rss_after / rss_before - 1
    # a slot's cache changed
    spoilt = sum(a != b for a, b in zip(greedy, greedy_after) if a is not None and b is not None)
    problems = list(all_at_once)
    if abs(growth) > 0.05:
        problems.append(f"RSS {rss_before} -> {rss_after} KiB ({growth:+.1%})")
    if spoilt or len(set(greedy)) != 1 or None in greedy_after:
        problems.append(f"greedy text per slot before {greedy}, after {greedy_after}")
    record.trial(not problems and not leaked, spoilt, leaked, "; ".join(problems))
    record.note += (
        f"; {counts['completed']} completed, {counts['left']} left, {counts['refused']} refused "
        f"after {TRIES} tries ({sum(t for _, t in outcomes)} 429s retried) in {took:.0f} s; "
        f"RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB ({growth:+.1%})"
    )
    record.check()


def test_the_server_listens_on_127_0_0_1_only(single_server, fault):
    record = fault("Nobody let in: the server binds 127.0.0.1", "xrun --serve without --host")
    found = listening(single_server.pid)
    record.trial(found == [("127.0.0.1", single_server.port)], why=f"listening on {found}")
    record.check()
