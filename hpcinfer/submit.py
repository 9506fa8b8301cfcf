"""`python -m hpcinfer.submit [overrides]`: plan, shard and run a batch-inference job.

    python -m hpcinfer.submit                                  # demo: tiny model, demo prompts, local
    python -m hpcinfer.submit dp=2 data.input='data/*.parquet' sampling=greedy run_dir=runs/a

Writes the run directory (config.yaml, plan.json, manifest.parquet), runs the ranks with the
cluster backend, then finalize; prints the run directory last on stdout. `cluster=local` runs the
ranks here and finalizes; `cluster=slurm` queues the worker jobs and a dependent finalize job and
returns (or, with wait=true, blocks until finalize ends). Re-running with the same `run_dir` and
the same config continues an unfinished run (done shards are kept once their outputs check out:
rundir/integrity.py; a torn one is set aside and generated again); it is a no-op for a finished
run and for one whose jobs are still queued or whose submission is live (cron-safe).
Exit codes: 0 done (or nothing to do), 1 the run failed or is incomplete, 2 bad config or data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from typing import Any, Dict, Iterator, List

from omegaconf import OmegaConf

from hpcinfer.cli import hydra_main
from hpcinfer.config import RunConfig, load_run_config, to_yaml
from hpcinfer.errors import EXIT_OK, RunInProgress, UserError
from hpcinfer.launch import launcher_for
from hpcinfer.launch.base import Launcher
from hpcinfer.planning.prepare import default_run_dir, prepare
from hpcinfer.rundir.files import atomic_write
from hpcinfer.rundir.integrity import describe, verify_done
from hpcinfer.rundir.manifest import read_manifest, write_manifest
from hpcinfer.rundir.paths import RunDir
from hpcinfer.secrets import redact

# Config sections that determine the results: a run directory is only continued with equal values.
RESULT_KEYS = ("model", "sampling", "data", "prompt", "chat", "engine", "expert", "tp", "pp", "dp", "ep")
SHARDING_KEYS = ("schedule.mode", "schedule.shards_per_rank", "schedule.prefix")  # they change the manifest


def log(msg: str) -> None:
    print(f"hpcinfer: {msg}", file=sys.stderr, flush=True)


def config_differences(old: RunConfig, new: RunConfig) -> List[str]:
    """Result-affecting keys whose values differ, as 'key: old -> new'. Pure."""
    a, b = (
        _flat(OmegaConf.to_container(OmegaConf.structured(old))),
        _flat(OmegaConf.to_container(OmegaConf.structured(new))),
    )
    keys = sorted(
        k for k in set(a) | set(b) if (k.split(".")[0] in RESULT_KEYS or k in SHARDING_KEYS) and a.get(k) != b.get(k)
    )
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def submit(cfg: RunConfig) -> int:
    submitted_at = time.time()
    launcher = launcher_for(cfg)
    launcher.prestart()  # local on GPUs: vLLM's import starts now, beside planning (launch/local.py)
    try:
        return _submit(cfg, launcher, submitted_at)
    finally:
        launcher.close()


def _submit(cfg: RunConfig, launcher: Launcher, submitted_at: float) -> int:
    rd = RunDir(cfg.run_dir or default_run_dir())
    resuming = rd.exists()
    foreign = not resuming and rd.path.exists() and any(rd.path.iterdir())
    with _undone_on_error(rd):  # input converted for this run (inputs/) goes again if it is refused
        # every config/data check happens here; only input other than Parquet is written (converted)
        prep = prepare(cfg, launcher, input_dir=rd.inputs_dir if not foreign else None)
        plan = replace(prep.plan, submitted_at=submitted_at)
        launcher.check(plan)
        if resuming:
            diff = config_differences(load_run_config(rd.config), cfg)
            if diff:
                raise UserError(
                    f"run_dir {str(rd.path)!r} holds a run with a different config "
                    f"({'; '.join(diff[:5])}); choose a new run_dir"
                )
        elif foreign:
            raise UserError(f"run_dir {str(rd.path)!r} exists and is not an hpcinfer run directory")
    rd.create()
    try:
        with rd.locked():
            if resuming and rd.summary.exists() and rd.results.exists():
                log(f"already finished: {rd.path}")
                print(rd.path)
                return EXIT_OK
            if not resuming:
                atomic_write(rd.config, to_yaml(cfg))
                atomic_write(
                    rd.plan,
                    redact(json.dumps(plan.to_json(), indent=1, sort_keys=True, default=str), os.environ) + "\n",
                )
                placement = os.path.relpath(prep.placement, rd.manifest.parent) if prep.placement else None
                write_manifest(str(rd.manifest), prep.shards, prep.inputs.schema, placement)
            else:
                if read_manifest(str(rd.manifest))[0] != prep.shards:
                    raise UserError(f"the input files changed since {str(rd.path)!r} was planned; choose a new run_dir")
                # what is done is what is provably complete: a torn shard is set aside (and said),
                # so that the launcher's unfinished_ranks starts the ranks that generate it again
                verified = verify_done(rd, prep.shards, "submit")
                for repair in verified.repairs:
                    log(f"repaired: {describe(repair)}")
                log(f"continuing {rd.path}: {len(verified.done)} of {plan.shards} shard(s) already done")
            for note in plan.notes:
                log(note)
            log(f"run directory {rd.path}")
            log(f"{plan.rows} rows, {plan.shards} shard(s), {plan.ranks} rank(s) on {plan.device_kind}")
            code = launcher.start(rd, plan)
    except RunInProgress as e:  # cron-safe: another submission of this run is live
        log(f"{e}: nothing to do")
        print(rd.path)
        return EXIT_OK
    if code is None:  # queued: follow it outside the lock (a later cron submission sees its jobs)
        code = launcher.follow(rd, plan)
    print(rd.path)
    return code


@contextlib.contextmanager
def _undone_on_error(rd: RunDir) -> Iterator[None]:
    """Remove what the block created for the run (the converted inputs/, and the run directory
    and its parents when they did not exist) if it raises: a refused submission writes nothing."""
    first_new = next((p for p in [rd.path, *rd.path.parents][::-1] if not p.exists()), None)
    had_inputs = rd.inputs_dir.exists()
    try:
        yield
    except BaseException:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        elif not had_inputs:
            shutil.rmtree(rd.inputs_dir, ignore_errors=True)
        raise


def main() -> None:
    hydra_main(submit)


if __name__ == "__main__":
    main()
