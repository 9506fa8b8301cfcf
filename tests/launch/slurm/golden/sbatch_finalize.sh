#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --cpus-per-task=1
#SBATCH --dependency=afterany:101:102
#SBATCH --job-name=hpcinfer-finalize
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mail-type=END
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/runs/r1/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@90
#SBATCH --time=60
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
source /opt/venv/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/r1/slurm/%j_%t_log.out /opt/venv/bin/python -u -m submitit.core._submit /runs/r1/slurm
