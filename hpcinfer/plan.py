"""`python -m hpcinfer.plan [overrides]`: print the layout a submit would use, and exit 2 with a
one-line reason when it cannot work. Writes nothing."""

from __future__ import annotations

import sys

from hpcinfer.cli import compose
from hpcinfer.errors import exit_on_user_error
from hpcinfer.launch import launcher_for
from hpcinfer.planning.prepare import prepare
from hpcinfer.planning.render import format_plan


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error():
        cfg = compose(argv)
        print(format_plan(prepare(cfg, launcher_for(cfg), build=False).plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
