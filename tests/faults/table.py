"""The README's "What happens when…" table, from the fault suite's own recorded results.

    python -m pytest tests/faults -m slow        # records into build/faults/results.json
    python -m tests.faults.table                 # rewrites README.md between the markers
    python -m tests.faults.table --print         # only prints the table

Each fault shows its slow-suite figures when the file has them, else the fast suite's. Nothing
here is typed by hand but the promise each row tests (WHAT_HAPPENS).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tests.faults.conftest import REPO, results_path

BEGIN, END = "<!-- faults-table -->", "<!-- /faults-table -->"

# fault name prefix -> what the user sees (what every trial checked)
WHAT_HAPPENS = {
    "Compile interrupted: SIGINT": "exit 130 and one line; the temporary folder is gone before "
    "exit; earlier artifacts and the source untouched; the rerun succeeds",
    "Compile interrupted: SIGKILL": "no folder poses as artifacts (a manifest over files that do "
    "not match it); earlier artifacts and the source untouched; the rerun succeeds and removes "
    "what the kill left",
    "Disk full": "one line (`write failed (No space left on device)`), exit 2; the disk as empty "
    "as before",
    "Artifacts attacked": "refused in one line naming the file, exit 2; nothing outside the "
    "folder opened (inotify), nothing changed, nothing left",
    "Parser fuzzed": "parsed into something that keeps the format's promises, or refused with "
    "one line (UserError); no other exception",
    "A rank dies": "xrun exits within 5 s with one line naming the rank; no rank outlives it; "
    "/dev/shm holds nothing new",
    "Nobody let in: SHM segment name": "128 random bits (`/xcompile-` + 32 hex digits), no "
    "repeats, digits evenly spread",
    "Nobody let in: SHM segment created": "mode 0600 under any umask; a name planted first "
    "(file or symlink) is refused and left untouched",
    "Nobody let in: another uid": "uid 65534 can neither open (`Permission denied`) nor attach",
    "Nobody let in: no pickle": "xrun runs under a guard that fails any pickle.load/loads, "
    "Unpickler or torch.load: none called, no pickle-loading library imported",
    "Nobody let in: the server binds": "without --host, `xrun --serve` listens on 127.0.0.1 "
    "only (its sockets in /proc/net/tcp, tcp6)",
    "Server: a rank dies": "the open streams end with an error event (or the connection "
    "closes), /health and new requests get 503 for about 1 s, then xrun exits within 5 s (code "
    "1, the launcher's line naming the rank) for a supervisor to restart it; no process of its "
    "group left; /dev/shm and its folder hold nothing new",
    "Server under load": "each request completes (finish_reason; streams end with [DONE]), is "
    "left by its client, or gets 429 (retried); last trial: no slot busy after, all slots "
    "usable at once, each slot gives the greedy text it gave before, RSS within 5 % of after a "
    "warm-up",
}
ORDER = [
    "Compile interrupted",
    "Disk full",
    "Artifacts attacked",
    "Parser fuzzed",
    "A rank dies",
    "Nobody let in",
]


def chosen(records: dict) -> list[dict]:
    """One record per fault: the slow suite's when there is one."""
    by_fault: dict[str, dict] = {}
    for record in records.values():
        have = by_fault.get(record["fault"])
        if have is None or (record["suite"] == "slow" and have["suite"] != "slow"):
            by_fault[record["fault"]] = record

    def rank(record):
        group = next((i for i, g in enumerate(ORDER) if record["fault"].startswith(g)), 99)
        return group, record["fault"]

    return sorted(by_fault.values(), key=rank)


def render(data: dict) -> str:
    rows = chosen(data.get("records", {}))
    lines = [
        "| What happens when… | trials | survived | data lost | leftovers | what each trial "
        "checked | measured |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        promise = next((v for k, v in WHAT_HAPPENS.items() if r["fault"].startswith(k)), "—")
        fault = r["fault"].replace("|", "\\|")
        note = r["note"]
        if r["survived"] < r["trials"] and r.get("failures"):
            first = re.sub(r"/\S*/", "…/", r["failures"][0]).replace("\n", " ")
            note += f"; **{r['trials'] - r['survived']} failed**, first: {first[:110]}…"
        note = note.replace("|", "\\|")
        suite = "" if r["suite"] == "slow" else " (fast suite)"
        lines.append(
            f"| {fault}{suite} | {r['trials']:,} | {r['survived']:,} | {r['lost']} | "
            f"{r['leftovers']} | {promise} | {note} |"
        )
    slow = sum(r["suite"] == "slow" for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    lines.append("")
    lines.append(
        f"Recorded by the suite itself ({slow} of {len(rows)} rows from the slow suite, "
        f"{seconds / 60:.0f} min of cases) on {data.get('written', '?')}; regenerate with "
        "`python -m tests.faults.table`."
    )
    return "\n".join(lines)


def rewrite(readme: Path, table: str) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"{readme}: no {BEGIN} ... {END} section to rewrite; add the two markers")
    readme.write_text(pattern.sub(lambda m: f"{BEGIN}\n{table}\n{END}", text, count=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=results_path())
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--print", action="store_true", help="print, do not rewrite")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"{args.results}: no results ({e}); run python -m pytest tests/faults first")
    table = render(data)
    if args.print:
        print(table)
    else:
        rewrite(args.readme, table)
        print(f"rewrote the faults table in {args.readme} ({table.count(chr(10)) - 3} rows)")


if __name__ == "__main__":
    main()
