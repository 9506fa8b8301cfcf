"""Progress of a run while it runs, read from its ranks' records (`ranks/<r>.json`): rows done
of total, output tokens/s, ETA, how many ranks are in each state. A bar on a terminal, a line
every few seconds in logs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Dict

from hpcinfer.rundir.paths import RunDir


@dataclass
class Snapshot:
    rows_total: int
    rows_done: int = 0
    output_tokens: int = 0
    generation_started_at: float | None = None
    states: Dict[int, str] = field(default_factory=dict)
    ended_at: Dict[int, float] = field(default_factory=dict)  # ranks whose latest attempt ended: when

    @property
    def tokens_per_second(self) -> float:
        if not self.generation_started_at:
            return 0.0
        return self.output_tokens / max(time.time() - self.generation_started_at, 1e-9)


def snapshot(rd: RunDir, rows_total: int) -> Snapshot:
    """The run's progress now, summed over its ranks' records."""
    snap = Snapshot(rows_total)
    for rank, record in rd.read_ranks().items():
        snap.rows_done += record.rows_done
        snap.output_tokens += record.output_tokens
        snap.states[rank] = record.state
        if record.ended and record.finished_at is not None:
            snap.ended_at[rank] = record.finished_at
        started = record.generation_started_at
        if started and (snap.generation_started_at is None or started < snap.generation_started_at):
            snap.generation_started_at = started
    return snap


class ProgressDisplay:
    """tqdm bar on a terminal; otherwise a plain line every `log_interval` seconds."""

    def __init__(self, rows_total: int, log_interval: float = 10.0, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.rows_total, self.log_interval, self._last_log, self._t0 = rows_total, log_interval, 0.0, time.time()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=rows_total, unit="row", file=self.stream, dynamic_ncols=True, desc="generating")

    def update(self, snap: Snapshot, final: bool = False) -> None:
        states = " ".join(f"{k}:{v}" for k, v in sorted(_count(snap.states).items()))
        if self.bar is not None:
            self.bar.update(max(0, snap.rows_done - self.bar.n))
            self.bar.set_postfix_str(f"{snap.tokens_per_second:,.0f} tok/s, ranks {states}", refresh=False)
            if final:
                self.bar.close()
            return
        now = time.time()
        if final or now - self._last_log >= self.log_interval:
            self._last_log = now
            rate = snap.rows_done / max(now - self._t0, 1e-9)
            eta = f"{(snap.rows_total - snap.rows_done) / rate:,.0f}s" if rate > 0 else "?"
            print(
                f"hpcinfer: {snap.rows_done}/{snap.rows_total} rows, {snap.tokens_per_second:,.0f} output tok/s, "
                f"ETA {eta}, ranks {states or 'starting'}",
                file=self.stream,
                flush=True,
            )


def _count(states: Dict[int, str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for v in states.values():
        out[v] = out.get(v, 0) + 1
    return out
