"""How much a CPU machine's speed drifts, and whether two cores drift together: why
`bench/overhead.py` runs its sides at the same time on a CPU machine (`--mode concurrent`).

    .venv/bin/python bench/cpu_drift.py [--seconds 120] [--cores 0 1] [--size 512]

Each of the given cores runs one process (pinned there, one torch thread) that times a fixed
matrix product (`--size` square, float32) back to back and records how many it did in each second,
all cores at the same time. Printed, for windows of 1, 10, 20 and 30 s: the coefficient of
variation (standard deviation over mean) of one core's speed from window to window (what two runs
one after the other on that core would differ by) and of the ratio between the first two cores'
speeds in the same window (what two runs at the same time, one per core, would differ by). Also
the steal time (the hypervisor's) over the run, from /proc/stat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import List, Sequence

PROBE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
a = torch.randn(int(sys.argv[2]), int(sys.argv[2]))
start, speeds = float(sys.argv[3]), []
while time.time() < start:
    time.sleep(0.01)
for second in range(int(sys.argv[1])):  # one count per wall-clock second from the common start
    n, end = 0, start + second + 1
    while time.time() < end:
        a @ a
        n += 1
    speeds.append(n)
print(json.dumps(speeds))
"""


def cv(xs: Sequence[float]) -> float:
    return statistics.pstdev(xs) / statistics.mean(xs)


def windows(xs: Sequence[float], w: int) -> List[float]:
    """Sums over consecutive whole windows of `w` seconds. Pure."""
    return [sum(xs[i : i + w]) for i in range(0, len(xs) - w + 1, w)]


def drift_table(a: Sequence[float], b: Sequence[float], sizes: Sequence[int] = (1, 10, 20, 30)) -> List[tuple]:
    """(window s, windows, cv of core a's speed, cv of the ratio a/b) per window size. Pure."""
    out = []
    for w in sizes:
        wa, wb = windows(a, w), windows(b, w)
        if len(wa) >= 2:
            out.append((w, len(wa), cv(wa), cv([x / y for x, y in zip(wa, wb)])))
    return out


def steal() -> tuple:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return fields[7], sum(fields)


def main() -> None:
    ap = argparse.ArgumentParser(description="a CPU machine's drift, one core and two cores at the same time")
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--cores", type=int, nargs="+", default=sorted(os.sched_getaffinity(0))[:2])
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    if len(a.cores) < 2:
        sys.exit("--cores: two or more")
    import time

    start = time.time() + 3.0  # every probe has imported torch by then
    s0 = steal()
    procs = [
        subprocess.Popen(
            ["taskset", "-c", str(c), sys.executable, "-c", PROBE, str(a.seconds), str(a.size), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for c in a.cores
    ]
    speeds = [json.loads(p.communicate()[0]) for p in procs]
    s1 = steal()
    print(f"cores {a.cores}, {a.seconds} s, {a.size}x{a.size} float32 products per second, one thread per core")
    for c, xs in zip(a.cores, speeds):
        print(f"  core {c}: mean {statistics.mean(xs):.1f}/s, min {min(xs)}, max {max(xs)}")
    print(f"  steal: {(s1[0] - s0[0]) / max(1, s1[1] - s0[1]):.2%} of the machine's time")
    print(
        f"\n| window s | windows | cv of core {a.cores[0]}'s speed | cv of the ratio core {a.cores[0]}/core {a.cores[1]} |"
    )
    print("| ---: | ---: | ---: | ---: |")
    for w, n, one, ratio in drift_table(speeds[0], speeds[1]):
        print(f"| {w} | {n} | {one:.1%} | {ratio:.1%} |")


if __name__ == "__main__":
    main()
