"""Code that runs inside one rank process: the rank's engine and the loop that streams shards
through it, started by a launcher (launch/) as `python -m hpcinfer.rank.worker <run_dir>` (and,
for a replica spanning nodes, `python -m hpcinfer.rank.headless <run_dir>` on its other nodes).

    worker.py    the rank's process: RankState (its RankRecord), ShardLoop, finish_shard;
                 should_restart / record_exit for launchers once a rank process has ended
    work.py      where shards come from: the Work protocol, StaticWork, ClaimedWork
    schedule.py  the dynamic schedule's balancing policy (which shard to claim next; pure)
    requests.py  the request seam: rows -> engine requests (prompts, templates, chat, OpenAI
                 Batch lines, as plan.json's RequestSpec says), engine outputs -> RowResult
    engine.py    the Engine protocol, VllmEngine and create_engine (the one factory); vLLM's
                 own chat rendering and OpenAI request reading
    headless.py  a non-leader node of a replica spanning nodes, and LeaderWatch

May import: rundir/, hpcinfer.config, hpcinfer.errors, and launch/env.py: the environment
contract, both sides (who the rank is: `context_from_env`; a spanning replica's engine arguments:
`replica_engine_args`). vLLM is imported only where an engine or a headless
node is built.
"""
