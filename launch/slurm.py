"""Write an sbatch script: one ``torchrun`` per node, c10d rendezvous on the job's first node."""
from __future__ import annotations

import os
import shlex

from loomtrain.fsutil import atomic_write_text

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --signal=B:USR1@120
#SBATCH --output={output_dir}/slurm-%j.out
{partition_line}
# Written by `loomtrain slurm`. One torchrun per node; ranks meet at the first node of the job.
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-8}}
# Forward Slurm's pre-emption warning (USR1) to the trainer as SIGTERM: it checkpoints and exits.
trap 'kill -TERM $srun_pid 2>/dev/null' USR1
srun --kill-on-bad-exit=1 torchrun \\
  --nnodes={nodes} --nproc-per-node={gpus} \\
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \\
  --max-restarts={max_restarts} \\
  -m loomtrain.launch.train {args} --resume auto &
srun_pid=$!
wait $srun_pid
"""


def write_sbatch(exp, config_path: str, overrides: list[str], nodes: int, gpus_per_node: int,
                 output: str | None = None, partition: str | None = None, time: str = "24:00:00",
                 job_name: str = "loomtrain", max_restarts: int = 3) -> str:
    out_dir = os.path.abspath(exp.train.output_dir)
    path = output or os.path.join(out_dir, "launch.sbatch")
    args = " ".join([shlex.quote(os.path.abspath(config_path))] + [f"--set {shlex.quote(o)}" for o in overrides])
    text = TEMPLATE.format(job_name=job_name, nodes=nodes, gpus=gpus_per_node, cpus=max(1, 8 * gpus_per_node),
                           time=time, output_dir=out_dir, max_restarts=max_restarts, args=args,
                           partition_line=f"#SBATCH --partition={partition}" if partition else "")
    atomic_write_text(path, text)
    os.chmod(path, 0o755)
    return path
