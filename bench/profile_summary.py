"""Summarise py-spy's collapsed stacks (`bench.rounds --profile DIR`): where each process spent its samples.

For every `<process>.txt` under DIR, per thread: the lines with the most
samples of their own (self) and the xaind frames present in the most samples
(inclusive). `bench.rounds --profile` records with `--idle`, so samples are
wall time of each thread (200 per second), waiting included: a reactor
thread's share in `doPoll` is the share of time it had nothing to do.

    .venv/bin/python -m bench.profile_summary /tmp/prof/http-10x10 [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def short(frame: str, line: bool = False) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path}{':' + match['line'] if line and match['line'] else ''})"


def summarise(path: Path, top: int) -> str:
    per_thread: dict[str, dict[str, collections.Counter[str]]] = {}
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] or frames[0]
        tables = per_thread.setdefault(thread, {"self": collections.Counter(), "inclusive": collections.Counter()})
        totals[thread] += count
        if len(frames) > 1:
            tables["self"][short(frames[-1], line=True)] += count
        for frame in {short(f) for f in frames[1:]}:
            if "xaind/" in frame or "bench/" in frame:
                tables["inclusive"][frame] += count
    total = sum(totals.values())
    out = [f"== {path.stem}: {total} samples ({total / 200:.1f} s at 200 Hz; with --idle, wall time of every thread)"]
    for thread, count in totals.most_common(4):
        tables = per_thread[thread]
        out.append(f"  thread {thread}: {count} samples")
        out.append("    self (function, file:line):")
        out += [f"      {n / count:6.1%}  {frame}" for frame, n in tables["self"].most_common(top)]
        if tables["inclusive"]:
            out.append("    inclusive, xaind frames:")
            out += [f"      {n / count:6.1%}  {frame}" for frame, n in tables["inclusive"].most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    files = sorted(args.directory.glob("*.txt"))
    if not files:
        print(f"no py-spy output in {args.directory}", file=sys.stderr)
        return 1
    for path in files:
        print(summarise(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
