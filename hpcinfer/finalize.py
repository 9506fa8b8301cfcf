"""`python -m hpcinfer.finalize <run_dir>`: merge a run's shards into results.parquet and
summary.json (see merge.py). Exits 1 with the list of missing shards when the run is incomplete;
nothing is published then."""
from __future__ import annotations

import sys

from hpcinfer.errors import EXIT_FAILED, EXIT_USAGE, RunIncomplete
from hpcinfer.rundir.merge import finalize


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m hpcinfer.finalize <run_dir>", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = finalize(argv[0])
    except RunIncomplete as e:
        print(f"hpcinfer: incomplete, nothing published: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{summary['rows']} rows ({summary['rows_failed']} failed) -> {summary['results']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
