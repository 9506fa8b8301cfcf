"""`python -m hpcinfer.resume <run_dir> [key=value ...]`: continue a run with its saved config.

Schedules only the unfinished work (ranks whose shards are not all done; inside a shard, only the
rows its durable parts lack), locally or on Slurm, as the run was submitted. Overrides may change
how it runs (`cluster.*`, `wait=true`, `checkpoint.*`, `rank_retries`), never what it computes:
a change to the model, sampling, data, engine arguments or layout is refused, as `submit` refuses
it. Same exit codes as submit.
"""

from __future__ import annotations

import sys
from typing import List

from omegaconf import OmegaConf

from hpcinfer.config import RunConfig, to_run_config
from hpcinfer.errors import ConfigError, UserError, exit_on_user_error, one_line
from hpcinfer.rundir.paths import RunDir
from hpcinfer.submit import submit


def saved_config(run_dir: str, overrides: List[str]) -> RunConfig:
    """The run's saved config.yaml with `key=value` overrides applied (type-checked)."""
    rd = RunDir(run_dir)
    if not rd.exists():
        raise UserError(f"{run_dir!r} is not an hpcinfer run directory (no config.yaml)")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise UserError(f"resume takes key=value overrides, got {bad[0]!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.load(rd.config), OmegaConf.from_dotlist(overrides))
        cfg = to_run_config(merged)
    except UserError:
        raise
    except Exception as e:  # unknown keys, wrong types
        raise ConfigError(f"cannot apply {' '.join(overrides)!r} to the saved config: {one_line(str(e))}") from None
    cfg.run_dir = str(rd.path)
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    with exit_on_user_error():
        return submit(saved_config(argv[0], argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
