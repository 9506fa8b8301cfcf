"""Errors a user can act on, and the one place that turns them into an exit code.

A `UserError` is a problem with what the user asked for (config, data, paths): the CLIs print
its one-line message on stderr and exit with `EXIT_USAGE` (2), never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

EXIT_OK = 0
EXIT_FAILED = 1  # the run itself failed or is incomplete (a rank crashed, shards missing)
EXIT_USAGE = 2  # bad config, bad data, bad paths: nothing was run


class UserError(Exception):
    """A problem with the user's config or data; the message names the offending value."""


class ConfigError(UserError):
    """An invalid or inconsistent configuration."""


class DataError(UserError):
    """Input data that cannot be read or does not fit the config."""


class RunInProgress(UserError):
    """Another submission of the same run directory is live (a lock holder, or queued jobs)."""


class RunIncomplete(Exception):
    """Finalize found missing, partial or duplicated shard outputs; nothing was published."""


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


@contextlib.contextmanager
def exit_on_user_error(prog: str = "hpcinfer") -> Iterator[None]:
    """Print a UserError as one line on stderr and exit 2; let everything else through."""
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def exit_on_signal(signum, frame) -> None:
    """A signal handler: leave through SystemExit(128 + signum), the shell's convention, so that
    `finally`/`except` blocks (stopping ranks, recording state) run."""
    raise SystemExit(128 + signum)
