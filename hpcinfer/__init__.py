"""hpcinfer: offline LLM batch inference on Slurm/HPC clusters with vLLM."""

__version__ = "0.1.0"
