"""`python -m hpcinfer.status <run_dir>`: where a run stands, local or Slurm.

Per rank: state (queued / starting / running / done / failed / stopped), host, rows done of its
total, output tokens/s; for the run: rows done of total, tokens/s, ETA, the Slurm job ids and
their states, the finalize outcome, what was repaired (files found torn or unreadable and set
aside, rundir/integrity.py), and the log tail of every failed rank. Everything is read
from the run directory (and squeue/sacct for job states), so it works from any login node.

Exit codes: 0 finished or still in progress, 1 failed or incomplete, 2 not a run directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional

from hpcinfer.errors import EXIT_FAILED, EXIT_OK, UserError, exit_on_user_error
from hpcinfer.rundir import records
from hpcinfer.rundir.files import tail
from hpcinfer.rundir.integrity import describe
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import RankRecord

# the run's states (a rank's are records.STARTING ... records.STOPPED, and QUEUED before it starts)
FINISHED, FAILED, RUNNING, QUEUED = "finished", records.FAILED, records.RUNNING, "queued"


def rank_state(record: Optional[RankRecord], job_state: Optional[str]) -> str:
    """A rank's state from its own record and, on Slurm, its job's state. Pure.

    A rank that never wrote a record is queued while its job waits, starting while it runs, and
    failed once its job ended; a rank whose record says running while its job has ended was lost
    (killed, node failure) and counts as failed."""
    own = record.state if record is not None else None
    job_over = job_state is not None and job_state not in (
        "PENDING",
        "RUNNING",
        "COMPLETING",
        "CONFIGURING",
        "REQUEUED",
        "SUSPENDED",
        "UNKNOWN",
    )
    if own in records.TERMINAL:
        return own
    if own in (records.STARTING, records.RUNNING):
        return records.FAILED if job_over else own
    if job_state == "PENDING":
        return QUEUED
    if job_over:
        return records.FAILED
    return records.STARTING if job_state in ("RUNNING", "CONFIGURING") else QUEUED


def run_state(ranks: List[str], finalize_exit: Optional[int], published: bool) -> str:
    """The run's state in one word, from its ranks' states (`rank_state`). Pure."""
    if published:
        return FINISHED
    if finalize_exit not in (None, 0) or (
        ranks and all(r in records.TERMINAL for r in ranks) and any(r != records.DONE for r in ranks)
    ):
        return FAILED
    if any(r in (records.STARTING, records.RUNNING, records.DONE) for r in ranks):
        return RUNNING
    return QUEUED


def collect(rd: RunDir, now: Optional[float] = None) -> Dict[str, Any]:
    """Everything `status` shows, as data."""
    now = now or time.time()
    plan = rd.read_plan()
    files = rd.read_ranks()
    jobs = _jobs(rd)
    ranks = []
    for rp in plan.rank_plans:
        r = rp.rank
        job_id = jobs["of_rank"].get(r)
        state = rank_state(files.get(r), jobs["states"].get(job_id) if job_id else None)
        own = files.get(r) or RankRecord(r)
        started, ended = own.generation_started_at, own.generation_ended_at or now
        tps = own.output_tokens / max(ended - started, 1e-9) if started else 0.0
        ranks.append(
            {
                "rank": r,
                "state": state,
                "host": own.host,
                "rows_done": own.rows_done,
                "rows": rp.rows,
                "output_tokens": own.output_tokens,
                "tokens_per_second": tps,
                "job": job_id,
                "error": own.error,
                "log": str(rd.rank_log(r)),
            }
        )
    outcome = rd.read_finalize_outcome()
    published = rd.summary.exists() and rd.results.exists()
    rows_done = sum(r["rows_done"] for r in ranks)
    starts = [f.generation_started_at for f in files.values() if f.generation_started_at]
    elapsed = now - min(starts) if starts else 0.0
    rate = rows_done / elapsed if elapsed > 0 else 0.0
    active = [r for r in ranks if r["state"] == records.RUNNING]
    return {
        "run_dir": str(rd.path),
        "state": run_state([r["state"] for r in ranks], outcome.exit_code if outcome else None, published),
        "rows": plan.rows,
        "rows_done": rows_done,
        "ranks": ranks,
        "tokens_per_second": (
            sum(r["tokens_per_second"] for r in active)
            if active
            else (rd.read_optional(rd.summary) or {}).get("output_tokens_per_second") or 0.0
        ),
        "eta_seconds": (plan.rows - rows_done) / rate if rate > 0 and not published else None,
        "jobs": jobs["summary"],
        "finalize": outcome.to_json() if outcome else None,
        "repaired": [describe(r) for r in rd.read_repairs()],
        "model": plan.model["name"],
        "layout": f"dp={plan.dp} tp={plan.tp} pp={plan.pp}",
    }


def _jobs(rd: RunDir) -> Dict[str, Any]:
    """The cluster's jobs of the run (its launcher's `jobs`: Slurm job ids and states); none locally."""
    from hpcinfer.config import load_run_config
    from hpcinfer.launch import launcher_for

    return launcher_for(load_run_config(rd.config)).jobs(rd) or {"of_rank": {}, "states": {}, "summary": None}


def render(info: Dict[str, Any]) -> str:
    """The report `status` prints. Pure."""
    pct = 100.0 * info["rows_done"] / info["rows"] if info["rows"] else 100.0
    eta = f", ETA {_duration(info['eta_seconds'])}" if info["eta_seconds"] is not None else ""
    lines = [
        f"run       {info['run_dir']}",
        f"state     {info['state']} ({info['model']}, {info['layout']})",
        f"rows      {info['rows_done']}/{info['rows']} done ({pct:.0f}%), "
        f"{info['tokens_per_second']:,.0f} output tok/s{eta}",
    ]
    jobs = info["jobs"]
    if jobs:
        workers = ", ".join(f"{j} {s}" for j, s in jobs["workers"].items())
        fin = ", ".join(f"{j} {s}" for j, s in jobs["finalize"].items())
        reasons = "".join(f" [{j}: {r}]" for j, r in sorted(jobs["reasons"].items()))
        lines.append(f"jobs      workers {workers}; finalize {fin}{reasons}")
    lines.append(f"{'rank':<6}{'state':<10}{'host':<14}{'rows':>13}{'tok/s':>10}  job")
    for r in info["ranks"]:
        done = f"{r['rows_done']}/{r['rows']}"
        lines.append(
            f"{r['rank']:<6}{r['state']:<10}{(r['host'] or '-'):<14}{done:>13}"
            f"{r['tokens_per_second']:>10,.0f}  {r['job'] or '-'}"
        )
    if info["finalize"]:
        lines.append(f"finalize  exit {info['finalize']['exit_code']}: {info['finalize']['message']}")
    for line in info.get("repaired", []):
        lines.append(f"repaired  {line}")
    for r in info["ranks"]:
        if r["state"] == records.FAILED:
            lines.append(f"--- rank {r['rank']} failed: {r['error'] or 'its job ended before it finished'}")
            lines.append(f"--- last lines of {r['log']}:")
            lines.append(tail(r["log"], 15))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcinfer.status", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        rd = RunDir(args.run_dir)
        if not rd.exists() or not rd.plan.exists():
            raise UserError(f"{args.run_dir!r} is not an hpcinfer run directory (no config.yaml/plan.json)")
        info = collect(rd)
    print(render(info))
    return EXIT_FAILED if info["state"] == FAILED else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
