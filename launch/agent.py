"""``torchrun`` for jobs with spare hosts: torch's own elastic agent and c10d rendezvous, with two defects of
torch 2.13 fixed, and one rule added, that a job with spares (``--nnodes=N:N`` and more agents than N) needs:

1. **Restarts for spares that can never join.** After a host is lost, the last round is complete with fewer
   than N participants, so the waiting spares enter the rendezvous's *wait list* instead of its *redundancy
   list* (where torch means spares to wait). Once the new round is full, the spares left over stay in the wait
   list, which the healthy agents read as new nodes (``num_nodes_waiting() > 0``) and restart every worker
   for, round after round (seen here: 45 s of restarts with 2 spares, until chance left them in the
   redundancy list). Fixed: a full round reports no waiting node, and a node left in the wait list of a full
   round moves to the redundancy list.
2. **A spare still waiting when the job ends fails it.** The agent returns ``None`` after the rendezvous's
   graceful exit and torchrun then raises ``AttributeError`` (exit 1), so ``srun`` reports a failed step.
   Fixed: that spare exits 0.
3. **A spare can take a survivor's place.** After a failure every agent, survivor or spare, waits in the wait
   list for the next round, and the first N to reach it form the world: a survivor whose workers failed a
   moment later than the others was left out (seen in CI: the new world was one survivor and two spares, so
   two hosts' snapshot chunks were out of reach and the run fell back to disk). Fixed: an agent that has
   never been in a completed round (a spare) joins a later round only ``LOOMTRAIN_SPARE_GRACE_S`` seconds
   (default 5) after it first sees it open, so the survivors come first and spares fill what is left.

Arguments are torchrun's. With no spares these paths never run, and the patches change nothing.
"""
from __future__ import annotations

import os
import sys
import time

SPARE_GRACE_ENV = "LOOMTRAIN_SPARE_GRACE_S"


def patch_torch_elastic() -> bool:
    """Apply the fixes; False (and one line) where this torch's internals differ from the ones they were
    written against, which leaves plain torchrun."""
    try:
        from torch.distributed.elastic.agent.server import api as agent_api
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

        join, waiting, run = dr._RendezvousJoinOp.__call__, dr.DynamicRendezvousHandler.num_nodes_waiting, \
            agent_api.SimpleElasticAgent.run
        remove_from_wait_list = dr._Action.REMOVE_FROM_WAIT_LIST
        keep_alive, sync, should_keep_alive = dr._Action.KEEP_ALIVE, dr._Action.SYNC, dr._should_keep_alive
        succeeded = agent_api.RunResult(state=agent_api.WorkerState.SUCCEEDED)
    except (ImportError, AttributeError) as e:
        print(f"loomtrain.launch.agent: torch's elastic internals differ ({e}); spares may restart healthy "
              f"workers", file=sys.stderr)
        return False
    if getattr(join, "_loomtrain", False):
        return True

    try:
        grace = float(os.environ.get(SPARE_GRACE_ENV, "5"))
    except ValueError:
        raise SystemExit(f"{SPARE_GRACE_ENV}: a number of seconds, got {os.environ[SPARE_GRACE_ENV]!r}") from None
    seen = {"member": False, "opened": {}}  # this agent: ever in a completed round; when it saw each round open

    def join_keeping_spares_redundant(self, ctx, deadline):
        state = ctx.state
        if state.complete and ctx.node in state.participants:
            seen["member"] = True
        if (not seen["member"] and state.round > 0 and not state.complete and not state.closed
                and ctx.node not in state.participants):  # a spare, and a round after a failure is open
            opened = seen["opened"].setdefault(state.round, time.monotonic())
            if time.monotonic() - opened < grace:  # the survivors first
                return keep_alive if should_keep_alive(ctx) else sync
        if (state.complete and not state.closed and ctx.node in state.wait_list
                and ctx.node not in state.participants and len(state.participants) >= ctx.settings.max_nodes):
            return remove_from_wait_list  # next time round: added to the redundancy list
        return join(self, ctx, deadline)

    def num_nodes_waiting(self):
        count = waiting(self)  # syncs the state
        return count if len(self._state_holder.state.participants) < self._settings.max_nodes else 0

    def run_spare_exits_cleanly(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        return succeeded if result is None else result

    join_keeping_spares_redundant._loomtrain = True
    dr._RendezvousJoinOp.__call__ = join_keeping_spares_redundant
    dr.DynamicRendezvousHandler.num_nodes_waiting = num_nodes_waiting
    agent_api.SimpleElasticAgent.run = run_spare_exits_cleanly
    return True


def main(argv=None) -> None:
    patch_torch_elastic()
    from torch.distributed.run import main as torchrun

    torchrun(argv)


if __name__ == "__main__":
    main()
