"""Slurm: the launcher on the login node and the entry inside each task.

launcher.py  SlurmLauncher: sbatch parameters (pure, golden-tested), the cluster check,
             submission through submitit, jobs.json, waiting, job states for `status`
layout.py    ranks -> jobs, nodes and tasks (arrays, spanning replicas). Pure
partition.py what a partition's nodes offer (sinfo, parsed) against what the jobs ask. Pure
queue.py     squeue / sacct, parsed (pure) and asked (edge)
nodelist.py  Slurm host lists (pure parser) and addresses (edge)
task.py      a task's identity from SLURM_*: its rank, GPUs, cores, ports. Pure but for a bind
entry.py     what runs in a task: RankTask (its rank's process, supervised) and the finalize job
"""
