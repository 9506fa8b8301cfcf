"""The Slurm launcher: submit a planned run as Slurm jobs through submitit, from a login node.

- Worker jobs: one job whose tasks are the ranks (nodes x tasks per node from the plan's job
  layout), or job arrays whose elements are such jobs, one per replica group. Every task runs
  `entry.RankTask` over the ranks of its job (a resubmission carries only the ranks with
  unfinished shards); entry.py maps the task to its rank.
- Finalize: one small job that depends on all worker jobs with `afterany`, so that it runs
  whatever the workers' outcome and reports an incomplete run instead of waiting forever
  (`afterok` would leave it PENDING with DependencyNeverSatisfied after a failed rank).
- `jobs.json` in the run directory records every submission's job ids (for status and resume).

The sbatch parameters are pure functions of the config and plan, checked against golden files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from hpcinfer.config import RunConfig, slurm_time_minutes
from hpcinfer.errors import EXIT_FAILED, EXIT_OK, UserError, one_line
from hpcinfer.launch.base import Launcher, Placement, unfinished_ranks
from hpcinfer.launch.progress import ProgressDisplay, snapshot
from hpcinfer.launch.slurm.layout import array_chunks, rank_groups, slurm_jobs, slurm_rank_place
from hpcinfer.launch.slurm.partition import (
    SINFO_ARGS,
    SlurmNode,
    check_partition,
    largest_memory_mb,
    mem_mb,
    parse_sinfo_nodes,
    partition_nodes,
)
from hpcinfer.launch.slurm.queue import cancel, is_live, job_states, summarized
from hpcinfer.planning.devices import Devices, NodeMemory
from hpcinfer.rundir.files import atomic_write_json
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import JobLayout, Plan, Submission

START_TEST_CLUSTER = 'bash slurm/cluster.sh start && eval "$(bash slurm/cluster.sh env)"'


class SlurmLauncher(Launcher):
    """Ranks as the tasks of Slurm jobs, finalize as a dependent job (cluster=slurm)."""

    _nodes: Optional[List[SlurmNode]] = None  # sinfo's nodes, asked once (None: not yet, or unavailable)
    _nodes_asked = False

    def devices(self) -> Devices:
        """One compute node as configured (the submitting machine is not one)."""
        c = self.cfg.cluster
        return Devices(
            gpus=[str(i) for i in range(c.gpus_per_node)],
            cpus=list(range(c.cpus_per_task or 1)),
            gpu_memory_gib=c.gpu_memory_gib,
        )

    def gpus_offered(self, devices: Devices) -> Optional[int]:
        return None  # the cluster's size is not known here: Slurm refuses what it cannot run

    def place(self, ranks: int, devices: Devices) -> Placement:
        jobs = slurm_jobs(self.cfg, ranks)
        where = [slurm_rank_place(jobs, r, self.cfg.gpus_per_rank, bool(devices.gpus)) for r in range(ranks)]
        notes = []
        if jobs.idle_tasks(ranks):
            notes.append(
                f"{jobs.idle_tasks(ranks)} Slurm task(s) get no rank: {ranks} rank(s) do not fill "
                f"{jobs.groups} job(s) x {jobs.nodes_per_job} node(s) x {jobs.tasks_per_node} task(s)"
            )
        throttle = self.cfg.cluster.array_parallelism
        if throttle is not None and jobs.groups == 1:
            notes.append(f"cluster.array_parallelism={throttle} has no effect: the ranks are one job, not an array")
        return Placement(
            [w[0] for w in where],
            [w[1] for w in where],
            [w[2] for w in where],
            nodes=jobs.nodes,
            jobs=jobs,
            notes=notes,
            node_ranks=jobs.tasks_per_node,  # one task per rank (per node of a rank spanning nodes)
        )

    def node_memory(self) -> Optional[NodeMemory]:
        """cluster.mem when set (what the job gets of each node), else the RealMemory of the
        partition's largest node (sinfo); None when neither is known."""
        c = self.cfg.cluster
        mb = mem_mb(c.mem)
        if mb:
            return NodeMemory(mb / 1024, f"a node (cluster.mem={c.mem})", "cluster.ranks_per_node")
        nodes = self.sinfo_nodes()
        if not nodes:
            return None
        try:
            name, own = partition_nodes(nodes, c.partition)
        except UserError:  # no such partition: check() says so before submitting
            return None
        mb = largest_memory_mb(own)
        return (
            NodeMemory(mb / 1024, f"a node of partition {name!r} (RealMemory)", "cluster.ranks_per_node")
            if mb
            else None
        )

    def sinfo_nodes(self) -> Optional[List[SlurmNode]]:
        """Every partition's nodes as sinfo lists them (asked once); None when sinfo is not here or fails."""
        if not self._nodes_asked:
            self._nodes_asked = True
            out = _run(SINFO_ARGS) if shutil.which("sinfo") else None
            self._nodes = parse_sinfo_nodes(out.stdout) if out is not None and out.returncode == 0 else None
        return self._nodes

    def check(self, plan: Plan) -> None:
        """Slurm answers, and the partition (cluster.partition, else the default one) offers the
        GPUs, CPUs, memory and nodes the plan's jobs ask for: before anything is written."""
        check_cluster(self.cfg)
        nodes = self.sinfo_nodes()
        if not nodes:
            part = self.cfg.cluster.partition
            if part and _run(["scontrol", "show", "partition", part]).returncode != 0:
                raise UserError(f"cluster.partition={part!r} does not exist on this Slurm cluster (sinfo lists them)")
            log("warning: sinfo listed no nodes: the partition's GPUs, CPUs and memory were not checked")
            return
        check_partition(self.cfg, plan.jobs or slurm_jobs(self.cfg, plan.ranks), nodes)

    def start(self, rd: RunDir, plan: Plan) -> None:
        """Submit worker jobs for the ranks with unfinished shards, and finalize, unless this run's
        jobs are still queued or running."""
        record = last_submission(rd)
        live = live_jobs(record)
        if live:
            log(f"already queued: {', '.join(f'job {j} {s}' for j, s in live.items())}; nothing submitted")
            return None
        ranks = unfinished_ranks(rd, plan)
        jobs = plan.jobs if len(ranks) == plan.ranks else slurm_jobs(self.cfg, len(ranks), nodes=None)
        record = submit_jobs(rd, self.cfg, ranks, jobs)
        log(
            f"queued worker job(s) {' '.join(record.workers)} for {len(ranks)} rank(s) ({jobs.groups} job(s) x "
            f"{jobs.nodes_per_job} node(s)) and finalize job {record.finalize} (afterany)"
        )
        log(f"follow it with: python -m hpcinfer.status {rd.path}")
        return None

    def follow(self, rd: RunDir, plan: Plan) -> int:
        """wait=true: until the last submission's finalize job ends, with its exit code."""
        record = last_submission(rd)
        return wait(rd, record, plan.rows, self.cfg.cluster.poll_s) if self.cfg.wait and record else EXIT_OK

    def jobs(self, rd: RunDir) -> Optional[Dict[str, Any]]:
        record = last_submission(rd)
        if not record:
            return None
        of_rank = rank_jobs(record, self.cfg.cluster.max_array_size)
        raw = job_states([*record.workers, record.finalize])  # array elements come with their arrays
        states = summarized(set(of_rank.values()) | set(record.workers) | {record.finalize}, raw)
        return {
            "of_rank": of_rank,
            "states": states,
            "summary": {
                "workers": {w: states[w] for w in record.workers},
                "finalize": {record.finalize: states[record.finalize]},
                "reasons": {j: r for j, (s, r) in raw.items() if s == "PENDING" and r and r != "None"},
            },
        }


def check_cluster(cfg: RunConfig) -> None:
    """Before anything is written: Slurm's clients are here and the controller answers. UserError
    naming what is missing otherwise (the partition: `SlurmLauncher.check`)."""
    if not shutil.which("sbatch"):
        raise UserError(
            "cluster=slurm needs Slurm's sbatch on PATH (run submit on a login node; for a "
            f"test cluster on this machine: {START_TEST_CLUSTER})"
        )
    ping = _run(["scontrol", "ping"])
    if ping.returncode != 0 or "UP" not in ping.stdout:
        why = (ping.stderr or ping.stdout).strip().splitlines()
        raise UserError(
            f"the Slurm controller does not answer (scontrol ping: {why[-1] if why else 'no output'}); "
            f"is SLURM_CONF set? For a test cluster on this machine: {START_TEST_CLUSTER}"
        )


def _run(args: List[str]) -> subprocess.CompletedProcess:
    """A Slurm client command's result (exit 1 with the reason when it cannot run or hangs)."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return subprocess.CompletedProcess(args, 1, "", str(e))


def log(msg: str) -> None:
    print(f"hpcinfer: {msg}", file=sys.stderr, flush=True)


def _common(cfg: RunConfig) -> Dict[str, Any]:
    c = cfg.cluster
    out: Dict[str, Any] = {k: getattr(c, k) for k in ("partition", "account", "qos") if getattr(c, k)}
    if c.setup:
        out["setup"] = list(c.setup)
    return out


def worker_parameters(cfg: RunConfig, jobs: JobLayout) -> Dict[str, Any]:
    """submitit SlurmExecutor parameters of the worker jobs. Pure."""
    c = cfg.cluster
    p = {
        **_common(cfg),
        "job_name": c.job_name,
        "time": slurm_time_minutes(c.time),
        "nodes": jobs.nodes_per_job,
        "ntasks_per_node": jobs.tasks_per_node,
        "signal_delay_s": c.signal_delay_s,
        "stderr_to_stdout": True,
    }
    if c.gpus_per_node:
        p["gpus_per_node"] = min(c.gpus_per_node, jobs.tasks_per_node * cfg.gpus_per_rank)
    for key in ("cpus_per_task", "mem", "constraint", "array_parallelism"):
        if getattr(c, key) is not None:
            p[key] = getattr(c, key)
    if c.exclusive:
        p["exclusive"] = True
    if c.sbatch:
        p["additional_parameters"] = dict(c.sbatch)
    return p


def finalize_parameters(cfg: RunConfig, worker_ids: List[str]) -> Dict[str, Any]:
    """submitit parameters of the finalize job: one task after every worker job ends. Pure."""
    c = cfg.cluster
    p = {
        **_common(cfg),
        "job_name": f"{c.job_name}-finalize",
        "time": slurm_time_minutes(c.finalize_time),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": c.finalize_cpus,
        "stderr_to_stdout": True,
        "additional_parameters": {**c.sbatch, "dependency": dependency(worker_ids), "kill-on-invalid-dep": "yes"},
    }
    if c.finalize_mem:
        p["mem"] = c.finalize_mem
    return p


def dependency(job_ids: List[str]) -> str:
    """`afterany`: finalize runs once every worker job (every array element) has ended, however."""
    return "afterany:" + ":".join(job_ids)


def executor(folder: str, cfg: RunConfig, parameters: Dict[str, Any]):
    import submitit

    ex = submitit.SlurmExecutor(folder=folder, python=cfg.cluster.python, max_num_timeout=3)
    ex.update_parameters(**parameters)
    return ex


def submit_jobs(rd: RunDir, cfg: RunConfig, ranks: List[int], jobs: JobLayout) -> Submission:
    """Submit worker jobs for `ranks` (laid out as `jobs`), then finalize; record them in
    jobs.json. Returns the record."""
    from hpcinfer.finalize import finalize_job
    from hpcinfer.launch.slurm.entry import RankTask

    folder = str(rd.slurm_dir)
    groups = rank_groups(ranks, jobs)
    workers: List[str] = []
    try:
        ex = executor(folder, cfg, worker_parameters(cfg, jobs))
        if len(groups) == 1:
            workers.append(ex.submit(RankTask(), str(rd.path), groups[0]).job_id)
        else:
            for first, count in array_chunks(len(groups), cfg.cluster.max_array_size):
                elements = ex.map_array(RankTask(), [str(rd.path)] * count, groups[first : first + count])
                workers.append(elements[0].job_id.split("_")[0])
        fin = executor(folder, cfg, finalize_parameters(cfg, workers)).submit(finalize_job, str(rd.path)).job_id
    except Exception as e:  # sbatch refused (bad partition, account, limits): take back what was queued
        cancel(workers)
        raise UserError(f"Slurm refused the submission: {one_line(_sbatch_message(e))}") from None
    record = Submission(time.time(), workers, fin, groups)
    previous = (rd.read_optional(rd.jobs) or {}).get("submissions", [])
    atomic_write_json(rd.jobs, {"submissions": previous + [record.to_json()]})
    return record


def _sbatch_message(e: Exception) -> str:
    out = getattr(e, "output", None) or getattr(e, "stderr", None)
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return (out or str(e)).strip()[-500:]


def last_submission(rd: RunDir) -> Optional[Submission]:
    """The latest submission recorded in jobs.json, if any."""
    subs = (rd.read_optional(rd.jobs) or {}).get("submissions", [])
    return Submission.from_json(subs[-1]) if subs else None


def live_jobs(record: Optional[Submission]) -> Dict[str, str]:
    """{job id: state} of the record's jobs that are still pending or running."""
    if not record:
        return {}
    out = summarized([*record.workers, record.finalize])
    return {j: s for j, s in out.items() if is_live(s)}


def wait(rd: RunDir, record: Submission, rows: int, poll_s: float) -> int:
    """Block until this submission's finalize job has ended; its exit code (1 if it ended
    without recording an outcome: cancelled, timed out, node lost). Ctrl-C leaves the jobs."""
    fin = record.finalize
    display = ProgressDisplay(rows)
    unknown_since: Optional[float] = None
    try:
        while True:
            outcome = rd.read_finalize_outcome()
            if outcome and str(outcome.job_id) == str(fin):
                # the job writes its outcome and then ends: return once Slurm has it ended too, so
                # that what runs next (sacct, a dependent job, a script) sees the job done
                until_ended(fin, deadline=time.time() + max(30.0, 2 * poll_s), poll_s=min(poll_s, 0.5))
                display.update(snapshot(rd, rows), final=True)
                log(("" if outcome.exit_code else "done: ") + outcome.message)
                return int(outcome.exit_code)
            state = summarized([fin])[fin]
            unknown_since = (unknown_since or time.time()) if state == "UNKNOWN" else None
            if unknown_since and time.time() - unknown_since > max(120.0, 10 * poll_s):
                log(
                    f"finalize job {fin} is not known to Slurm (squeue, sacct) any more and recorded no "
                    f"outcome; python -m hpcinfer.status {rd.path}"
                )
                return EXIT_FAILED
            if not is_live(state) and state != "UNKNOWN":
                time.sleep(1.0)  # the outcome file may land just after the job ends
                late = rd.read_finalize_outcome()
                if not (late and str(late.job_id) == str(fin)):
                    display.update(snapshot(rd, rows), final=True)
                    log(
                        f"finalize job {fin} ended {state} without recording an outcome; "
                        f"see {rd.slurm_dir}/{fin}_0_log.out"
                    )
                    return EXIT_FAILED
                continue
            display.update(snapshot(rd, rows))
            time.sleep(poll_s)
    except KeyboardInterrupt:
        log(f"stopped waiting; the jobs keep running: python -m hpcinfer.status {rd.path}")
        raise


def until_ended(job: str, deadline: float, poll_s: float) -> str:
    """Wait until Slurm no longer lists `job` as pending, running or completing, or until
    `deadline` (time.time()); its last state."""
    while True:
        state = summarized([job])[job]
        if not is_live(state) or time.time() >= deadline:
            return state
        time.sleep(poll_s)


def rank_jobs(record: Submission, max_array_size: int) -> Dict[int, str]:
    """{rank: Slurm id of the job (or array element, '13_4') that runs it} for a submission."""
    groups = record.rank_groups
    if len(groups) == 1:
        return {r: record.workers[0] for r in groups[0]}
    out: Dict[int, str] = {}
    for job, (first, count) in zip(record.workers, array_chunks(len(groups), max_array_size)):
        for g in range(first, first + count):
            out.update({r: job if count == 1 else f"{job}_{g - first}" for r in groups[g]})
    return out
