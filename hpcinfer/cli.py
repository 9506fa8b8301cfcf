"""The command line: `hpcinfer <command> [args]` (the console script), the same as
`python -m hpcinfer.<command> [args]`, and the helpers the commands share.

Composing the Hydra config outside `@hydra.main` lets every command (and the tests) turn a bad
override into one line and exit code 2, and lets `submit -m` check every job of a sweep before
anything is launched.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Set

from omegaconf import OmegaConf

from hpcinfer.config import CLUSTERS, RunConfig, own_model_shape, register_configs, to_run_config
from hpcinfer.errors import ConfigError, exit_on_user_error, one_line
from hpcinfer.secrets import redact

CONF_DIR = os.environ.get("HPCINFER_CONF") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf"
)
MULTIRUN_FLAGS = ("-m", "--multirun")


def split_argv(argv: List[str]) -> tuple[List[str], List[str]]:
    """(Hydra flags, overrides): flags start with '-', overrides are key=value."""
    flags = [a for a in argv if a.startswith("-")]
    return flags, [a for a in argv if not a.startswith("-")]


def compose(overrides: List[str]) -> RunConfig:
    """The typed config for these overrides; ConfigError (one line) on any composition problem."""
    return compose_sweep(overrides)[0]


def compose_sweep(overrides: List[str]) -> List[RunConfig]:
    """One typed config per job of a (possibly multirun) override list, e.g. ['tp=1,2', 'dp=2']."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    register_configs()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = (
            BasicSweeper.split_arguments(parsed, None)[0] if any(o.is_sweep_override() for o in parsed) else [overrides]
        )
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            try:
                return [
                    to_run_config(own_model_shape(hydra_compose("config", overrides=list(job)), list(job)))
                    for job in jobs
                ]
            except ConfigError:
                raise
            except Exception as e:  # composition errors: keep the message, drop the trace, suggest a key
                raise ConfigError(
                    _unknown_key_message(e, lambda: hydra_compose("config")) or _hydra_message(e)
                ) from None
    except ConfigError:
        raise
    except Exception as e:  # override syntax errors
        raise ConfigError(_hydra_message(e)) from None
    finally:
        GlobalHydra.instance().clear()


def _unknown_key_message(e: BaseException, default_config: Callable[[], Any]) -> str:
    """For an override of a key that does not exist: the key, the closest known one, and how to add
    a key where that is possible (free-form sections like engine). '' for any other error."""
    text = _hydra_message(e)
    under_value = re.search(r"Error merging override ([\w.\-]+)=.*'\{\}'", text)  # ep.eplb=true: ep is a value
    m = re.search(r"Could not override '([\w.\-]+)'", text) or under_value
    if not m:
        return ""
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    try:
        known = _known_keys(OmegaConf.to_container(default_config(), resolve=False))
    except Exception:  # the hint is a nicety: never let it hide the error
        known = set()
    for kind in CLUSTERS.values():  # every cluster kind's keys, not just the default one's
        known |= {f"cluster.{f.name}" for f in dataclasses.fields(kind)}
    if m is under_value:
        same_leaf = sorted(k for k in known if k.rpartition(".")[2] == leaf and k != key)
        hint = f"; did you mean {same_leaf[0]}?" if same_leaf else ""
        return f"unknown config key {key!r}: {parent!r} is a value ({parent}=...), not a section{hint}"
    owners = [n for n, kind in CLUSTERS.items() if leaf in {f.name for f in dataclasses.fields(kind)}]
    if parent == "cluster" and owners:  # a key of another cluster kind, e.g. cluster=slurm cluster.gpus=4
        return (
            f"unknown config key {key!r} for the chosen cluster: only cluster={' and cluster='.join(owners)} "
            "has it (python -m hpcinfer.submit --cfg job shows the config)"
        )
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    typed = re.search(r"not in '\w+'", text)  # a typed section (dataclass): no key can be added there
    how = "" if typed else f"; to add a new key use +{key}=..."
    return f"unknown config key {key!r}{hint}{how} (python -m hpcinfer.submit --cfg job shows the config)"


def _known_keys(d: Dict[str, Any], prefix: str = "") -> Set[str]:
    out: Set[str] = set()
    for k, v in d.items():
        out.add(f"{prefix}{k}")
        if isinstance(v, dict):
            out |= _known_keys(v, f"{prefix}{k}.")
    return out


def _hydra_message(e: BaseException) -> str:
    """Hydra's message without the search path, struct details and traceback hints."""
    text = str(e)
    if e.__cause__ is not None and str(e.__cause__) not in text:
        text += " " + str(e.__cause__)
    for cut in ("\n    full_key", "Config search path", "\n    object_type"):
        text = text.split(cut)[0]
    text = re.sub(r"\s\w+_schema\b", "", text)  # the schemas are not options a user picks
    return redact(one_line(text.replace("To append to your config use", "to add a new key use")), os.environ)


def hydra_main(task: Callable[[RunConfig], int], argv: List[str] | None = None) -> None:
    """Check every job's config first (one-line errors, exit 2), then hand over to Hydra so that
    -m sweeps, --cfg and --help behave as Hydra users expect. `task` returns an exit code."""
    import hydra

    argv = sys.argv[1:] if argv is None else argv
    flags, overrides = split_argv(argv)
    if not flags or any(f in MULTIRUN_FLAGS for f in flags):
        with exit_on_user_error():
            runs = compose_sweep(overrides)
            if not flags and len(runs) == 1:  # one run: Hydra's main would compose it twice more
                raise SystemExit(task(runs[0]))  # (0.6 s) to do nothing else (run.dir '.', no logs)

    register_configs()
    codes: List[int] = []

    sweep_dirs: List[str] = []

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _main(cfg) -> None:
        with exit_on_user_error():
            run = to_run_config(own_model_shape(cfg, _job_overrides()))
            sweep = _sweep_dir()
            if sweep and run.run_dir is None:  # -m: every job's run directory inside the sweep's
                run.run_dir = os.path.join(sweep[0], sweep[1])
                sweep_dirs.append(sweep[0])
            codes.append(task(run))

    sys.argv = [sys.argv[0], *argv]
    _main()
    if sweep_dirs:
        print(
            f"hpcinfer: sweep {sweep_dirs[0]}: {len(codes)} run(s); compare them with "
            f"python -m hpcinfer.report {sweep_dirs[0]}",
            file=sys.stderr,
        )
    raise SystemExit(max(codes, default=0))


def _job_overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _sweep_dir() -> Optional[tuple]:
    """(sweep dir, this job's subdir) when running as a job of a -m sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return (hc.sweep.dir, hc.sweep.subdir) if hc.mode == RunMode.MULTIRUN else None


COMMANDS = {
    "submit": "plan, shard and run (or queue) a batch job: hpcinfer submit [key=value ...]",
    "plan": "show what a submit would do, writing nothing: hpcinfer plan [key=value ...]",
    "status": "where a run stands (ranks, rows, jobs, failed ranks' logs): hpcinfer status <run_dir>",
    "resume": "continue a run with its saved config: hpcinfer resume <run_dir> [key=value ...]",
    "finalize": "merge a run's shards into results.parquet again: hpcinfer finalize <run_dir>",
    "report": "compare the runs of a layout sweep: hpcinfer report <sweep_dir>",
    "doctor": "check that vLLM can run in this environment: hpcinfer doctor",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return (
        "usage: hpcinfer <command> [args]   (or: python -m hpcinfer.<command> [args])\n\n"
        "Offline LLM batch inference with vLLM, on this machine or a Slurm cluster.\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`hpcinfer submit --help` shows the config groups and keys."
    )


def main(argv: Optional[List[str]] = None) -> None:
    """The `hpcinfer` console script: run one command's `main` as `python -m hpcinfer.<command>` does."""
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(
            f"hpcinfer: error: unknown command {command!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" (commands: {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    sys.argv = [f"hpcinfer {command}", *rest]
    code = importlib.import_module(f"hpcinfer.{command}").main()
    raise SystemExit(code or 0)
