#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --constraint=h100
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=hpcinfer
#SBATCH --mail-type=END
#SBATCH --mem=400G
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/runs/r1/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
source /opt/venv/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/r1/slurm/%j_%t_log.out /opt/venv/bin/python -u -m submitit.core._submit /runs/r1/slurm
