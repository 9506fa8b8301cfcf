"""Errors a user can act on, and the one place that turns them into an exit code.

A `UserError` is a problem with what the user asked for (config, data, paths): the CLIs print
its one-line message on stderr and exit with `EXIT_USAGE` (2), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
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


class NoSpace(RunIncomplete):
    """Finalize ran out of disk space (or quota) while writing; nothing was published."""


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a full filesystem or an exceeded quota (Python's and pyarrow's OSErrors alike)."""
    if not isinstance(e, OSError):
        return False
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full_message(e: OSError, writing: str, then: str) -> str:
    """One line for a full disk: what was being written and what the user does next."""
    quota = " (disk quota exceeded)" if e.errno == errno.EDQUOT or "quota" in str(e).lower() else ""
    return f"no space left on device{quota} writing {writing}: free space and {then}"


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
