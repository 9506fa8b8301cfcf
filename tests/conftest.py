"""Shared fixtures. End-to-end tests run the real CLI (`python -m hpcinfer.submit`) on real vLLM
(the CPU build) with the built-in tiny model, in subprocesses, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (built-in models, demo data) for the whole session: models are built once."""
    return Path(os.environ.get("HPCINFER_TEST_CACHE") or tmp_path_factory.mktemp("hpcinfer-cache"))


@pytest.fixture(scope="session")
def cli_env(cache_dir) -> dict:
    """The environment a test's hpcinfer command runs with: the user's, plus the shared cache."""
    return {**os.environ, "HPCINFER_CACHE": str(cache_dir)}


@pytest.fixture(scope="session")
def hpcinfer(cli_env):
    """Run `python -m hpcinfer.<module> args...` as a user would; returns CompletedProcess."""

    def run(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"hpcinfer.{module}", *args], cwd=REPO, env=cli_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
