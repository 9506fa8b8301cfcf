"""On the submitting machine: from a config to a plan, before anything is written.

    prepare.py   config + launcher -> Prepared (plan, inputs, shards): the one entry point
    inputs.py    input discovery and checks (files, columns, ids, per-row caps)
    convert.py   input formats: JSON Lines, CSV, OpenAI Batch files streamed into Parquet (inputs/)
    prompts.py   how rows become requests: the run's RequestSpec, the files it names, its columns
    sharding.py  cutting the global row order into shards: by rows per rank (static) or by
                 estimated work (dynamic); work estimates. Pure
    layout.py    model shape, memory per GPU (CPU: per worker and node), expert layout, `make_plan`. Pure
    render.py    the plan as `hpcinfer plan` prints it. Pure
    devices.py   the devices and memory of this machine; splitting them among ranks and nodes
    models.py    the built-in tiny models and demo data, built offline on first use

May import: config, errors, secrets, doctor (the environment check) and rundir/ (the records it
produces). Never launch/ or rank/: a launcher is handed in (`prepare(cfg, launcher)`).
"""
