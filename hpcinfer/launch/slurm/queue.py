"""What Slurm says about a run's jobs: `squeue` (jobs still in slurmctld's memory), else `sacct`
(accounting, when the cluster has it). Parsing is pure; the commands are at the edge.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Dict, Iterable, List, Optional, Tuple

# States after which a job (or array element) will not run again by itself.
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
}


JobStates = Dict[str, Tuple[str, str]]  # job id ("12", "13_4") -> (state, reason)


def parse_squeue(text: str) -> JobStates:
    """Lines of `squeue -h -r -o '%i|%T|%r'` as {job id: (state, reason)}. Pure."""
    out: JobStates = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = (parts[1].upper(), parts[2] if len(parts) > 2 else "")
    return out


def parse_sacct(text: str) -> JobStates:
    """Lines of `sacct -n -X -P -o JobID,State,Reason` ('CANCELLED by 0' -> 'CANCELLED'). Pure."""
    out: JobStates = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = (
                parts[1].split()[0].upper() if parts[1].strip() else "UNKNOWN",
                parts[2] if len(parts) > 2 else "",
            )
    return out


def states_of(job_id: str, states: JobStates) -> List[Tuple[str, str]]:
    """The states that belong to `job_id`: itself, or every element of an array job."""
    if job_id in states:
        return [states[job_id]]
    return [v for k, v in states.items() if k.split("_")[0] == job_id]


def summarize(states: List[Tuple[str, str]]) -> str:
    """One word for a job or a whole array: RUNNING while any element is live, else the worst end."""
    if not states:
        return "UNKNOWN"
    names = [s for s, _ in states]
    for live in ("RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "PENDING"):
        if live in names:
            return live
    bad = [s for s in names if s != "COMPLETED"]
    return bad[0] if bad else "COMPLETED"


def summarized(job_ids: Iterable[str], known: Optional[JobStates] = None) -> Dict[str, str]:
    """{job id: summarize(...)} for jobs, arrays or array elements; asks Slurm unless `known`
    (the result of an earlier job_states call that covers them) is given."""
    ids = [str(j) for j in job_ids]
    states = job_states(ids) if known is None else known
    return {j: summarize(states_of(j, states)) for j in ids}


def is_live(state: str) -> bool:
    return state not in TERMINAL and state != "UNKNOWN"


def job_states(job_ids: Iterable[str]) -> JobStates:
    """Every known state of these jobs (array elements one by one). Missing ids are unknown."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    out: JobStates = {}
    for jid in ids:  # squeue fails as a whole on an id it no longer knows: ask one by one
        text = _run(["squeue", "-h", "-r", "-t", "all", "-j", jid, "-o", "%i|%T|%r"])
        out.update(parse_squeue(text or ""))
    missing = [j for j in ids if not states_of(j, out)]
    if missing and shutil.which("sacct"):
        out.update(
            parse_sacct(_run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State,Reason"]) or "")
        )
    return out


def cancel(job_ids: Iterable[str]) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        _run(["scancel", *ids])


def _run(cmd: List[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None
