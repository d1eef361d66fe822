"""Idle CPU of the watched-folder source as the folder fills with scored files: change notification vs polling.

    python -m bench.folder_idle                    # 100 and 10 000 scored files, 5 s of idle polling each
Scored files stay in place (``after: record``, as the demo): polling stats every one of them every poll;
with change notification (watchfiles) a poll looks only at what changed. Prints CPU seconds per idle second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from inspectd.streams.folder import LEDGER_NAME, FolderSource


def fill(root: Path, n: int) -> None:
    folder = root / "nut"
    folder.mkdir(parents=True)
    with open(root / LEDGER_NAME, "w") as ledger:
        for i in range(n):
            path = folder / f"{i:05d}.png"
            path.write_bytes(b"\x89PNG placeholder")
            st = path.stat()
            ledger.write(json.dumps({"path": f"nut/{path.name}", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                     "dead": False}) + "\n")


async def idle_cpu(root: Path, notify: bool, seconds: float) -> float:
    source = FolderSource(root, after="record", poll_interval_s=0.5, notify=notify, rescan_s=3600)
    await source.read(1, timeout_s=0.6)  # the first poll walks everything either way
    started_cpu, started = time.process_time(), time.monotonic()
    while time.monotonic() - started < seconds:
        await source.read(8)
    used = time.process_time() - started_cpu
    source.close()
    return used / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print("| scored files | polling: CPU s / s | change notification: CPU s / s |\n| --- | --- | --- |")
    for n in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            fill(root, n)
            polling = asyncio.run(idle_cpu(root, False, args.seconds))
            notified = asyncio.run(idle_cpu(root, True, args.seconds))
        print(f"| {n} | {polling:.3f} | {notified:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
