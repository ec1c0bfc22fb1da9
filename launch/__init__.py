"""Command line, process start and the torchrun/Slurm environment."""
