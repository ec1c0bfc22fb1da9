"""Write an sbatch script: one ``torchrun`` per node, c10d rendezvous on the job's first node.

What the script does on Slurm's pre-emption warning (``--signal=B:USR1@LEAD``, sent LEAD
seconds before the time limit, or ``scancel --signal=USR1 --batch JOBID``), as tried under a
real Slurm 22.05: the trap writes ``<output_dir>/STOP``; the trainer sees it at the end of
its step, checkpoints, and every rank exits 0, so torchrun and srun exit 0 as well. Signals
are not forwarded: srun turns a SIGTERM into SIGKILL of its tasks, torchrun exits 1 on
SIGTERM (a clean stop recorded as FAILED) and gives its workers 30 s, and USR1 kills torchrun.
The batch shell waits for srun in a loop (a trap interrupts ``wait``) and, after a stop on
the warning, requeues the job (``--requeue``), which resumes from that checkpoint
(``--resume auto``). A pre-emption without the warning, a time limit or ``scancel`` sends
SIGTERM to every process of the job and SIGKILL GraceTime (or KillWait) seconds later: the
ranks get the SIGTERM themselves, finish their step and checkpoint (torchrun gives them 30 s);
the batch shell traps it too, so it stays to clean up (Slurm, not the script, decides whether a
pre-empted job is requeued). The trainer's output directory is passed as an absolute path, so
a script submitted from any directory finds its STOP file, logs and exclude list. Each node's torchrun runs inside the hang monitor (``faulttol/hang_monitor.py``);
a host whose own ranks hung ``exclude_after`` times in the job, or that Slurm marks down, drained or not
responding after the step (a host that crashed), is excluded from the requeue, and a job
that failed because of a host not yet excluded is requeued without it (at most ``failure_requeues`` such
requeues per job; pre-emption requeues do not count).
Logs are appended across requeues. A last step on every node removes the
job's snapshot segments, whatever state the trainers left them in.

With ``spare_nodes`` S > 0 the job holds N + S nodes and a lost node does not end it: ``--no-kill`` keeps
the allocation and the step when a node fails, the agents meet at a rendezvous store the batch shell runs
outside torchrun (``launch/rdzv_store.py``) with ``--nnodes=N:N``, so S agents wait as spares (torchrun's agent
with its spare fixes, ``launch/agent.py``); after a node
is lost the survivors' ranks fail, their agents start a new round, and one spare completes it (the lost
host's snapshot chunks are rebuilt on it from parity). The batch shell runs on the first node, so that
node's loss ends the rendezvous: each node's task runs under ``launch/spare_watch.py``, which requeues the job
then (Slurm itself keeps a ``--no-kill`` job running without its batch host), and the requeued job resumes
from disk; any other node's loss is survived S times.
"""
from __future__ import annotations

import math
import os
import shlex

from loomtrain.fsutil import atomic_write_text

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={alloc_nodes}
{no_kill_line}#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
{mem_line}#SBATCH --time={time}
#SBATCH --signal=B:USR1@{lead}
#SBATCH --output={output_dir}/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
{partition_line}{extra_lines}
# Written by `loomtrain slurm`. One torchrun per node; ranks meet at the first node of the job.
# The pre-emption warning comes {lead} s before the time limit: enough for a step and a checkpoint of
# this model ({save_estimate}).
set -uo pipefail  # not -e: a trap interrupts `wait` with a non-zero status
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}
stop_file={stop_file}
preempted=0
on_warning() {{
  preempted=1
  echo "loomtrain: pre-emption warning: asking the trainer to checkpoint and stop ($stop_file)"
  touch "$stop_file"
}}
trap on_warning USR1
terminated=0
on_terminate() {{  # pre-emption without warning, time limit, scancel: the ranks got SIGTERM too and checkpoint
  terminated=1
  echo "loomtrain: SIGTERM: the ranks finish their step, checkpoint and stop"
}}
trap on_terminate TERM
echo "loomtrain: job $SLURM_JOB_ID start $(date -Is) (requeue count ${{SLURM_RESTART_COUNT:-0}})"
rm -f "$stop_file"  # a warning that came after the last step of an earlier run
# Each node's torchrun runs inside loomtrain's hang monitor: it names a rank that hangs, dumps every rank's
# stack under {output_dir}/health/, and kills the rank so that torchrun restarts the group from memory.
{store_block}srun {srun_flags} {step_watch}python -m loomtrain.faulttol.hang_monitor --nproc {gpus} -- {torchrun} \\
  --nnodes={nnodes} --nproc-per-node={gpus} \\
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"{rdzv_conf} \\
  --rdzv-id="$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}" --max-restarts={max_restarts} \\
  -m loomtrain.launch.train {args} --resume auto &
srun_pid=$!
status=0
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid"  # returns early when the trap runs
done
wait "$srun_pid"  # srun's own exit status, also when it ended while the trap ran
status=$?
{store_stop}# Snapshot segments never outlive the job (also after a SIGKILLed trainer or snapshot process).
{cleanup_srun} --ntasks-per-node=1 --overlap python -m loomtrain.faulttol.smp --cleanup-job {output_dir_q} || true
if [ -e "$stop_file" ]; then  # training ended before it saw the request: nothing left to requeue for
  rm -f "$stop_file"
  preempted=0
fi
# Hosts whose own ranks hung {exclude_after}+ times in this job (health/failures.jsonl) are left out of the requeue.
exclude=$(python -m loomtrain.faulttol.hang_monitor --exclude-list {output_dir_q} --min-failures {exclude_after} \\
  --job "$SLURM_JOB_ID" --nodes "$SLURM_JOB_NODELIST")
current=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2)
[ "$current" = "(null)" ] && current=""
excluded=$([ -n "$current" ] && scontrol show hostnames "$current" | paste -sd, -)
newly=""
for h in ${{exclude//,/ }}; do
  case ",$excluded," in *",$h,"*) ;; *) newly="$newly${{newly:+,}}$h" ;; esac
done
failure_requeues={output_dir_q}/health/failure-requeues-$SLURM_JOB_ID
requeue_job() {{
  echo "loomtrain: $1; requeueing job $SLURM_JOB_ID${{newly:+ without host(s) $newly}}"
  if [ -z "$newly" ]; then
    scontrol requeue "$SLURM_JOB_ID"
    return
  fi
  # Slurm changes ExcNodeList only once the job stops running: requeue it held, wait for the SIGTERM that
  # ends this script's run (trapped: KillWait seconds are left), then exclude and release.
  termed=0
  trap 'termed=1' TERM
  scontrol requeuehold "$SLURM_JOB_ID"
  for _ in $(seq 40); do [ "$termed" = 1 ] && break; sleep 0.5; done
  scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="${{excluded:+$excluded,}}$newly"
  for _ in 1 2 3; do  # never leave the job held: release until Slurm no longer reports the hold
    scontrol release "$SLURM_JOB_ID"
    scontrol show job "$SLURM_JOB_ID" | grep -q 'Reason=JobHeld' || break
    sleep 1
  done
}}
if [ "$terminated" = 1 ]; then
  echo "loomtrain: job $SLURM_JOB_ID ended by SIGTERM (status $status); Slurm decides whether it is requeued"
elif [ "$preempted" = 1 ] && [ "$status" = 0 ] && [ "{requeue}" = 1 ]; then
  requeue_job "checkpointed on the pre-emption warning"
elif [ "$status" != 0 ] && [ -n "$newly" ] && [ "{requeue}" = 1 ] \\
     && [ "$(cat "$failure_requeues" 2>/dev/null | wc -l)" -lt {failure_requeues} ]; then
  echo requeue >> "$failure_requeues"  # resumes from the last checkpoint on other hosts
  requeue_job "failed with host(s) that failed repeatedly or that Slurm marks unusable"
fi
exit "$status"
"""

SAVE_GBPS = 1.0  # assumed checkpoint write speed per node (GB/s) when estimating the pre-emption lead time


def preemption_lead_s(exp, nodes: int) -> tuple[int, str]:
    """Seconds of warning to ask for: three times an estimated checkpoint save, plus a step's worth, >= 120."""
    from loomtrain.launch.plan import planned_model_args

    params = planned_model_args(exp)[0].num_params()
    state_bytes = params * (4 + 4 + 8)  # fp32 parameters + gradients' room + AdamW's two moments
    save_s = state_bytes / nodes / (SAVE_GBPS * 1e9)
    lead = max(120, int(math.ceil(3 * save_s)) + 60)
    return lead, f"{params / 1e9:.2f}B parameters, ~{state_bytes / 1e9:.1f} GB of state, ~{save_s:.0f} s to save " \
                 f"per node at {SAVE_GBPS:g} GB/s"


# After a node was lost the batch shell's SLURM_JOB_NUM_NODES/SLURM_NNODES still count it, and srun refuses a step
# whose node count conflicts with the allocation's ("4 != 3", seen under the real Slurm): the cleanup step runs on
# the nodes the job holds now, as slurmctld counts them.
CLEANUP_ON_NODES_LEFT = ('env -u SLURM_JOB_NUM_NODES -u SLURM_NNODES srun --nodes="$(scontrol show job "$SLURM_JOB_ID" '
                         '| grep -o \' NumNodes=[0-9]*\' | cut -d= -f2)"')


def _spare_fields(nodes: int, spares: int, out_dir: str) -> dict:
    """What differs with spare nodes: the allocation, the step's reaction to a lost node, the store."""
    if not spares:
        return dict(alloc_nodes=nodes, no_kill_line="", store_block="", store_stop="", srun_flags="--kill-on-bad-exit=1",
                    nnodes=nodes, rdzv_conf="", torchrun="torchrun", cleanup_srun="srun", step_watch="")
    from loomtrain.launch.rdzv_store import AGENT_ENV, agent_rdzv_conf

    log = shlex.quote(os.path.join(out_dir, "rdzv-store-")) + "$SLURM_JOB_ID.log"
    exports = "".join(f"export {k}={v}\n" for k, v in AGENT_ENV.items())
    store_block = (f"# {spares} spare node(s): the rendezvous lives in a store this shell runs (outside torchrun), so it\n"
                   f"# survives the loss of any other node; torchrun's agents only connect to it (is_host=false).\n"
                   f"{exports}python -m loomtrain.launch.rdzv_store --port \"$MASTER_PORT\" >> {log} 2>&1 &\n"
                   f"store_pid=$!\n")
    return dict(alloc_nodes=nodes + spares, no_kill_line="#SBATCH --no-kill\n", store_block=store_block,
                store_stop='kill "$store_pid" 2>/dev/null\n', srun_flags="--no-kill --kill-on-bad-exit=0",
                nnodes=f"{nodes}:{nodes}", rdzv_conf=f" \\\n  --rdzv-conf={agent_rdzv_conf()}",
                torchrun="python -m loomtrain.launch.agent",  # torchrun, fixed for spares
                cleanup_srun=CLEANUP_ON_NODES_LEFT,  # and the batch host's loss requeues the job (launch/spare_watch.py)
                step_watch='python -m loomtrain.launch.spare_watch --store "$MASTER_ADDR:$MASTER_PORT" -- ')


def write_sbatch(exp, config_path: str, overrides: list[str], nodes: int, gpus_per_node: int,
                 output: str | None = None, partition: str | None = None, time: str = "24:00:00",
                 job_name: str = "loomtrain", max_restarts: int = 3, cpus_per_task: int | None = None,
                 mem: str | None = None, preempt_lead_s: int | None = None, requeue: bool = True,
                 sbatch_args: list[str] | None = None, exclude_after: int = 2, failure_requeues: int = 3,
                 spare_nodes: int = 0) -> str:
    """The sbatch script for ``exp``; returns its path. ``cpus_per_task`` defaults to 8 per GPU; ``spare_nodes``
    more nodes wait to replace a lost one (see the module docstring)."""
    from loomtrain.trainer.train import STOP_FILE

    out_dir = os.path.abspath(exp.train.output_dir)
    if any(c.isspace() or c == "%" for c in out_dir):
        from loomtrain.errors import ConfigError

        raise ConfigError(f"train.output_dir: an sbatch script cannot name a path with spaces or '%' in #SBATCH "
                          f"lines, got '{out_dir}'")
    path = output or os.path.join(out_dir, "launch.sbatch")
    # The output directory last and absolute: the job's working directory is wherever sbatch was run.
    sets = list(overrides) + [f"train.output_dir={out_dir}"]
    args = " ".join([shlex.quote(os.path.abspath(config_path))] + [f"--set {shlex.quote(o)}" for o in sets])
    cpus = cpus_per_task or max(1, 8 * gpus_per_node)
    lead, estimate = preemption_lead_s(exp, nodes)
    text = TEMPLATE.format(
        job_name=job_name, gpus=gpus_per_node, cpus=cpus, time=time, output_dir=out_dir,
        output_dir_q=shlex.quote(out_dir), max_restarts=max_restarts, args=args, lead=preempt_lead_s or lead,
        save_estimate=estimate, threads=max(1, cpus // max(1, gpus_per_node)),
        stop_file=shlex.quote(os.path.join(out_dir, STOP_FILE)), requeue=int(requeue),
        exclude_after=exclude_after, failure_requeues=failure_requeues,
        mem_line=f"#SBATCH --mem={mem}\n" if mem else "", **_spare_fields(nodes, spare_nodes, out_dir),
        partition_line=f"#SBATCH --partition={partition}\n" if partition else "",
        extra_lines="".join(f"#SBATCH {a}\n" for a in sbatch_args or []))
    atomic_write_text(path, text)
    os.chmod(path, 0o755)
    return path
