"""A command run in a forked process, for tests that run hundreds of commands that fail fast
(conftest.run_cli_forked). Loaded once into a multiprocessing fork server with the commands'
imports (hydra, pyarrow, hpcinfer's planning), each command is a fork of that server: a clean
process that never ran torch or vLLM, so that a command may import them, without a new
interpreter's start and imports each time. Not a test module."""

from __future__ import annotations

import atexit
import io
import os
import runpy
import sys
import traceback
import warnings

import hpcinfer.plan  # noqa: F401  (the imports every fork shares)
import hpcinfer.submit  # noqa: F401


def run(module: str, args, cwd: str, env: dict, out_path: str, err_path: str) -> None:
    """In the forked child: `python -m hpcinfer.<module> args` as far as the command can tell (its
    module as __main__, that argv, environment, working directory and standard streams); exits
    with the command's code."""
    code = 1
    try:
        os.dup2(os.open(out_path, os.O_WRONLY), 1)
        os.dup2(os.open(err_path, os.O_WRONLY), 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        atexit._clear()  # only the command's own exit handlers run
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        sys.argv = [f"hpcinfer.{module}", *args]
        try:
            runpy.run_module(f"hpcinfer.{module}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # as the interpreter reads it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
