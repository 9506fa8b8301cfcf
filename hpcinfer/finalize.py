"""Finalize: the last step of a run. `hpcinfer finalize <run_dir>` (or `python -m hpcinfer.finalize`)
runs it again by hand; the local launcher runs `finalize` after its ranks, and on Slurm the
finalize job (`finalize_job`, after every worker job with afterany) runs it and records its
outcome in finalize.json.

It publishes results.parquet and summary.json only for a complete run: every shard done, each
with exactly its rows in input order (rundir/merge.py streams and checks them). Otherwise it
lists the missing shards and publishes nothing (exit 1).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict

from hpcinfer.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, RunIncomplete
from hpcinfer.rundir.files import atomic_write_json
from hpcinfer.rundir.manifest import read_manifest
from hpcinfer.rundir.merge import build_summary, describe_missing, merge_shards, missing_shards
from hpcinfer.rundir.output import result_schema
from hpcinfer.rundir.parts import remove_parts
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import FinalizeOutcome


def finalize(run_dir: str) -> Dict:
    """Publish results.parquet and summary.json for a complete run (the summary); RunIncomplete
    otherwise."""
    rd = RunDir(run_dir)
    shards, schema = read_manifest(str(rd.manifest))
    missing = missing_shards(rd, shards)
    if missing:
        raise RunIncomplete(describe_missing(missing, len(shards)))
    totals = merge_shards(rd, shards, result_schema(schema))
    summary = build_summary(rd, shards, totals)
    atomic_write_json(rd.summary, summary)
    for s in shards:  # a rank killed between a done marker and its cleanup leaves the parts behind
        remove_parts(rd, s.shard)
    return summary


def finalize_job(run_dir: str) -> FinalizeOutcome:
    """The Slurm finalize job: `finalize`, its outcome recorded in finalize.json (what `submit
    wait=true` and `status` read); raises when the run is incomplete, so that the job ends FAILED."""
    rd = RunDir(run_dir)
    try:
        summary = finalize(run_dir)
        outcome = FinalizeOutcome(
            os.environ.get("SLURM_JOB_ID"),
            EXIT_OK,
            f"{summary['rows']} rows ({summary['rows_failed']} with errors) -> {summary['results']}",
        )
    except RunIncomplete as e:
        outcome = FinalizeOutcome(os.environ.get("SLURM_JOB_ID"), EXIT_FAILED, f"incomplete, nothing published: {e}")
    outcome.finished_at = time.time()
    rd.write_finalize_outcome(outcome)
    print(outcome.message, flush=True)
    if outcome.exit_code:
        raise RunIncomplete(outcome.message)
    return outcome


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: hpcinfer finalize <run_dir>", file=sys.stderr)
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    try:
        summary = finalize(argv[0])
    except RunIncomplete as e:
        print(f"hpcinfer: incomplete, nothing published: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{summary['rows']} rows ({summary['rows_failed']} failed) -> {summary['results']}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
