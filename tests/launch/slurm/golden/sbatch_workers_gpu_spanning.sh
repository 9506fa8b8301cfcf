#!/bin/bash

# Parameters
#SBATCH --gpus-per-node=8
#SBATCH --job-name=hpcinfer
#SBATCH --nodes=6
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/runs/r1/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/r1/slurm/%j_%t_log.out /opt/venv/bin/python -u -m submitit.core._submit /runs/r1/slurm
