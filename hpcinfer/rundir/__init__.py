"""The run directory: the contract through which submit, the ranks, finalize, status and resume
work together. Every step reads and writes only there, under fixed names, so any of them can be
rerun or inspected on its own.

    paths.py     RunDir: every path of a run directory, and the typed readers and writers
    records.py   what each JSON file holds (Plan with its RequestSpec, RankRecord, DoneRecord,
                 FinalizeOutcome, Submission) and a rank attempt's states (STARTING ... STOPPED, TERMINAL)
    files.py     atomic writes (temp file, fsync, rename), JSON reading, log tails
    integrity.py what counts as done: torn or unreadable files found, set aside, recorded
    manifest.py  the shards (manifest.parquet) and reading a shard's input rows
    output.py    the output schema: RowResult, the generated columns, shard and result tables
    parts.py     durable parts of a shard in progress, and its assembly
    claims.py    the dynamic schedule's claims of shards and the ranks' heartbeats
    merge.py     finalize: the ordered, verified results.parquet and summary.json
    openai_batch.py  results.jsonl: OpenAI Batch output lines, as vLLM's run-batch writes them

May import: hpcinfer.config, hpcinfer.errors, hpcinfer.secrets (and the package's version) and
itself; never planning/, launch/ or rank/, which all build on it.
"""
