#!/bin/bash

# Parameters
#SBATCH --array=0-2%2
#SBATCH --cpus-per-task=1
#SBATCH --job-name=hpcinfer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/runs/r1/slurm/%A_%a_0_log.out
#SBATCH --partition=debug
#SBATCH --signal=USR2@120
#SBATCH --time=30
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/r1/slurm/%A_%a_%t_log.out /opt/venv/bin/python -u -m submitit.core._submit /runs/r1/slurm
