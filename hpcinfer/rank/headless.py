"""A node of a replica spanning nodes that is not its leader: `python -m hpcinfer.rank.headless <run_dir>`.

Started by a launcher with the rank's environment plus the replica's (context.py,
HPCINFER_NODE_RANK > 0). It runs vLLM's workers for this node's GPUs the way `vllm serve
--headless` does (vllm/entrypoints/cli/serve.py, run_headless): the engine config built with
headless=True, then `MultiprocExecutor(config, monitor_workers=False)` and
`start_worker_monitor(inline=True)`. The workers join the leader's engine (the rank's
`hpcinfer.rank.worker`, node 0) through master_addr:master_port; only the leader reads rows and
writes outputs. This process writes nothing to the run directory.

vLLM's headless executor never returns while its workers live, even after the leader is gone. So
this process watches the leader's `ranks/<rank>.json` (`LeaderWatch`) and exits on its own once
the leader's attempt has ended (a state in records.TERMINAL): 0 when it is done, 1 otherwise. If
its own workers die first, it waits (at most LEADER_GRACE_S) for the leader to end too, so a
launcher that sees it exit can tell from the leader's state whether the replica will be started
again.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional, Tuple

from hpcinfer.config import engine_args, load_run_config
from hpcinfer.launch.env import RankContext, context_from_env, pin_to_cores, replica_engine_args
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import DONE, TERMINAL, RankRecord

POLL_S = 1.0

LEADER_GRACE_S = 600.0  # > vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300): the leader notices a lost node

SHUTDOWN_S = 30.0


class LeaderWatch:
    """Whether the leader attempt that this process serves has ended. An attempt is its record's
    `token`. A terminal state already on disk when the watch starts is taken for an earlier
    attempt's (the replica is being restarted) and ignored until the leader writes a newer one,
    or for `stale_s` at most: if no newer attempt comes by then (the leader had in fact ended
    before this node started), it counts, so a headless node never waits for a leader that will
    not start again."""

    def __init__(self, rd: RunDir, rank: int, stale_s: float = LEADER_GRACE_S):
        self.rd, self.rank, self.deadline = rd, rank, time.time() + stale_s
        first = rd.read_rank(rank)
        self.stale: Optional[RankRecord] = first if first is not None and first.state in TERMINAL else None

    def ended(self) -> Optional[str]:
        """The leader's final state (one of records.TERMINAL) once its attempt has ended; else None."""
        record = self.rd.read_rank(self.rank)
        if record is None or record.state not in TERMINAL:
            return None
        if self.stale is not None and record.token == self.stale.token and time.time() < self.deadline:
            return None
        return record.state

    def wait(self, timeout_s: float, poll_s: float = POLL_S) -> Optional[str]:
        deadline = time.time() + timeout_s
        while True:
            outcome = self.ended()
            if outcome or time.time() >= deadline:
                return outcome
            time.sleep(poll_s)


def exit_code(outcome: Optional[str]) -> int:
    return 0 if outcome == DONE else 1


def headless_args(run_dir: str, env) -> Tuple[RankContext, Dict[str, Any]]:
    """(rank context, engine arguments) of this process: the leader's engine arguments, plus this
    node's replica arguments."""
    rd = RunDir(run_dir)
    ctx = context_from_env(env)
    extra = replica_engine_args(env)
    if not extra or extra["node_rank"] == 0:
        raise RuntimeError(
            "hpcinfer.rank.headless runs the non-leader nodes of a replica spanning nodes: "
            f"HPCINFER_NNODES > 1 and HPCINFER_NODE_RANK > 0 must be set, got {extra or 'none'}"
        )
    cfg = load_run_config(rd.config)
    plan = rd.read_plan()
    return ctx, {**engine_args(cfg, plan.engine_args["model"], plan.device_kind, plan.input_format), **extra}


_executor: list = [None]


def engine_config(args: Dict[str, Any]):
    """The vLLM config of this node: the leader's, built the way its `vllm.LLM` builds it. vLLM's
    defaults depend on the usage context (on an H200: max_num_batched_tokens 16384 for the LLM
    class, 2048 otherwise), and a node whose profile run used another batch size than the
    leader's would wait forever in the first collective of different size (seen on 2x H200)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    return EngineArgs(**args).create_engine_config(usage_context=UsageContext.LLM_CLASS, headless=True)


def serve(args: Dict[str, Any]) -> None:
    """vLLM's headless multi-node workers (as run_headless does); returns when a worker has died."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    _executor[0] = MultiprocExecutor(engine_config(args), monitor_workers=False)
    print(
        f"headless node {args['node_rank']} of {args['nnodes']}: workers up, joined to "
        f"{args['master_addr']}:{args['master_port']}",
        flush=True,
    )
    _executor[0].start_worker_monitor(inline=True)


def _exit(code: int, why: str) -> None:
    """Shut this node's workers down (bounded) and leave, whatever the main thread is doing."""
    print(why, flush=True)
    executor = _executor[0]
    if executor is not None:
        t = threading.Thread(target=executor.shutdown, daemon=True)
        t.start()
        t.join(SHUTDOWN_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # vLLM's threads can hang interpreter teardown


def run(run_dir: str) -> int:
    ctx, args = headless_args(run_dir, os.environ)
    rank = ctx.rank
    if ctx.device_kind == "cpu":
        pin_to_cores(ctx.devices)
    watch = LeaderWatch(RunDir(run_dir), rank)

    def watch_leader() -> None:
        outcome = watch.wait(float("inf"))
        _exit(exit_code(outcome), f"leader of rank {rank} ended ({outcome}): headless node {args['node_rank']} exits")

    threading.Thread(target=watch_leader, daemon=True, name="LeaderWatch").start()
    print(
        f"rank {rank}: headless node {args['node_rank']} of {args['nnodes']} ({ctx.device_kind} {ctx.devices})",
        flush=True,
    )
    serve(args)
    outcome = watch.wait(LEADER_GRACE_S)
    _exit(
        exit_code(outcome),
        f"rank {rank}: the workers of headless node {args['node_rank']} ended; "
        f"leader {outcome or 'still running after ' + str(int(LEADER_GRACE_S)) + ' s'}",
    )
    return 1  # not reached


def main() -> None:
    # SIGTERM (scancel, a stopping launcher) and SIGUSR2 (Slurm: time limit or preemption): go now.
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: _exit(1, f"headless node: signal {signum}, exiting"))
    if len(sys.argv) != 2:
        print("usage: python -m hpcinfer.rank.headless <run_dir>", file=sys.stderr)
        raise SystemExit(2)
    try:
        run(sys.argv[1])
    except Exception as e:  # a bad environment, vLLM failing to start: say so, exit 1
        import traceback

        traceback.print_exc()
        _exit(1, f"headless node failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
