"""Finalize: the last step of a run. `hpcinfer finalize <run_dir>` (or `python -m hpcinfer.finalize`)
runs it again by hand; the local launcher runs `finalize` after its ranks, and on Slurm the
finalize job (`finalize_job`, after every worker job with afterany) runs it and records its
outcome in finalize.json.

It publishes results.parquet and summary.json only for a complete run: every shard done, each
with exactly its rows in input order (rundir/merge.py streams and checks them). Otherwise it
lists the missing shards and publishes nothing (exit 1). A done shard whose output is torn,
missing or unreadable is set aside and recorded (rundir/integrity.py): finalize refuses and says
that `resume` generates its rows again. A full disk is one line (NoSpace), nothing published.

results.parquet is absent or complete, whatever happens: it is written to a temp file and renamed;
summary.json is removed first and written last, so a summary always describes the results beside
it. One finalize of a run writes at a time (finalize.lock; a second one waits, then runs on its
own); the temp files of one that was killed are removed by the next.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hpcinfer.config import RunConfig
from hpcinfer.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, NoSpace, RunIncomplete, disk_full, disk_full_message
from hpcinfer.rundir.files import atomic_write_json, written_path
from hpcinfer.rundir.integrity import set_aside_shard, verify_done
from hpcinfer.rundir.manifest import Shard, load_placement, read_manifest
from hpcinfer.rundir.merge import TornShard, build_summary, describe_missing, merge_shards
from hpcinfer.rundir.openai_batch import write_results_jsonl
from hpcinfer.rundir.output import result_schema
from hpcinfer.rundir.parts import remove_parts
from hpcinfer.rundir.paths import RunDir
from hpcinfer.rundir.records import OPENAI_BATCH, FinalizeOutcome, Repair


def finalize(run_dir: str, cfg: Optional[RunConfig] = None) -> Dict:
    """Publish results.parquet and summary.json for a complete run (the summary); RunIncomplete
    otherwise (NoSpace on a full disk). `cfg`: the run's config where the caller has it (else
    read from the run directory)."""
    rd = RunDir(run_dir)
    shards, schema = read_manifest(str(rd.manifest))

    def waiting(holder: str) -> None:
        print(f"hpcinfer: waiting for another finalize of {rd.path} (pid {holder})", file=sys.stderr, flush=True)

    with rd.finalizing(waiting):
        try:
            return _finalize(rd, shards, schema, cfg)
        except OSError as e:
            if not disk_full(e):
                raise
            where = written_path(e.filename, str(rd.results))
            raise NoSpace(disk_full_message(e, where, f"run finalize again (hpcinfer finalize {rd.path})")) from None


def _finalize(rd: RunDir, shards: List[Shard], schema, cfg: Optional[RunConfig]) -> Dict:
    remove_temp_files(rd.path, (rd.results.name, rd.summary.name, rd.results_jsonl.name))  # a finalize killed mid-write
    verified = verify_done(rd, shards, "finalize")
    if verified.repairs:
        raise RunIncomplete(torn_message(rd, verified.repairs))
    missing = [s for s in shards if s.shard not in verified.done]
    if missing:
        raise RunIncomplete(describe_missing(missing, len(shards)))
    with contextlib.suppress(FileNotFoundError):  # a summary describes the results beside it
        rd.summary.unlink()
    plan = rd.read_plan()
    output = plan.output
    try:
        totals = merge_shards(rd, shards, result_schema(schema, output), output, load_placement(str(rd.manifest)))
    except TornShard as e:  # torn inside, its footer whole: set it aside like any torn shard
        with rd.repairing():
            repair = set_aside_shard(rd, e.shard, rd.shard_output(e.shard.shard), e.why, "finalize")
        raise RunIncomplete(torn_message(rd, [repair] if repair else [])) from None
    summary = build_summary(rd, shards, totals, plan, cfg)
    if plan.input_format == OPENAI_BATCH:  # the OpenAI Batch output file, line by line as run-batch's
        write_results_jsonl(rd.results, rd.results_jsonl, str(rd.path), str(plan.model.get("name") or "model"))
        summary["results_jsonl"] = str(rd.results_jsonl)
    atomic_write_json(rd.summary, summary)
    for s in shards:  # a rank killed between a done marker and its cleanup leaves the parts behind
        remove_parts(rd, s.shard)
    remove_temp_files(rd.shards_dir, [rd.shard_output(s.shard).name for s in shards])  # ranks killed mid-write
    return summary


def torn_message(rd: RunDir, repairs: List[Repair]) -> str:
    what = "; ".join(f"shard {int(Path(r.path).stem)} ({r.path}: {r.why})" for r in repairs[:5]) + (
        f"; and {len(repairs) - 5} more" if len(repairs) > 5 else ""
    )
    return (
        f"{len(repairs)} done shard(s) were not provably complete and were set aside ({what}); "
        f"`hpcinfer resume {rd.path}` generates their rows again"
    )


def remove_temp_files(directory: Path, names: Sequence[str]) -> None:
    """Remove the temp files atomic writes of `names` in `directory` leave when killed (kill -9)."""
    for name in names:
        for tmp in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


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
    except RunIncomplete as e:  # NoSpace too: one line, nothing published
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
