"""Where a rank spends its time, from `py-spy record --subprocesses --idle --format raw` output
(collapsed stacks; `bench/overhead.py --profile FILE` writes one):

    python bench/pyspy_summary.py FILE [--depth 2]

Prints, as shares of the samples: the rank's main thread while it generates (under
`ShardLoop.run`: stepping the engine, which includes waiting for its outputs, and the shard
loop's own work: opening shards, handing rows over, its records), the writer thread (parts, shard
outputs, done markers), and the engine-core process's busy loop (stepping the model, or waiting
for requests: then the GPU had nothing to do). Each frame is shown as `function (file)`.
"""

from __future__ import annotations

import argparse
import collections
import re
from typing import List

FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    func, path = m.groups()
    return f"{func} ({'/'.join(path.split('/')[-2:])})"


def after(frames: List[str], name: str, depth: int) -> str:
    i = max((i for i, f in enumerate(frames) if name in f), default=-1)
    return " > ".join(short(f) for f in frames[i + 1 : i + 1 + depth]) or "(itself)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    groups = {"rank main thread, in ShardLoop.run": collections.Counter(), "rank writer thread": collections.Counter()}
    groups["engine core busy loop"] = collections.Counter()
    for line in open(a.file):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        n = int(count)
        if any(f.startswith("ShardLoop.run ") for f in frames):
            groups["rank main thread, in ShardLoop.run"][after(frames, "ShardLoop.run ", a.depth)] += n
        elif any(f.startswith(("ShardLoop.complete ", "ShardCheckpoint.write ")) for f in frames):
            groups["rank writer thread"][after(frames, "_worker ", a.depth)] += n
        elif any(
            f.startswith("EngineCore.run_busy_loop ") or f.startswith("EngineCoreProc.run_busy_loop ") for f in frames
        ):
            groups["engine core busy loop"][after(frames, "run_busy_loop", a.depth)] += n
    for title, c in groups.items():
        total = sum(c.values())
        print(f"\n{title}: {total} samples")
        for key, n in c.most_common(a.top):
            print(f"  {100 * n / max(total, 1):5.1f}%  {key}")


if __name__ == "__main__":
    main()
