"""The rendezvous store of a job with spare hosts: a c10d TCPStore on a host that trains nothing.

torchrun's c10d rendezvous keeps its state in a TCPStore, by default on the job's first training host;
losing that host loses the rendezvous, so no spare can take its place. Started here instead (a head or
login node, the Slurm batch host, or in tests a namespace of its own), the store outlives any training
host. The agents then need ``--rdzv-conf is_host=false`` (they connect, never host it) and
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: otherwise every agent keeps the first round's bootstrap store
(on the first rank-0 host) for later rounds, and a round after that host died never completes (tried on
torch 2.13: the survivors loop until ``--max-restarts`` runs out).

    python -m loomtrain.launch.rdzv_store --port 29400        # prints one line once it listens
"""
from __future__ import annotations

import argparse
import datetime
import signal
import sys

AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # what each torchrun agent needs (see above)


def agent_rdzv_conf(join_timeout_s: int = 600, keep_alive_s: float = 5.0, keep_alive_misses: int = 3) -> str:
    """``--rdzv-conf`` for agents meeting at an external store. A dead host's agent leaves the rendezvous
    after ``keep_alive_s`` × ``keep_alive_misses`` seconds without a heartbeat: the time before a spare
    can complete the new round."""
    return (f"is_host=false,join_timeout={join_timeout_s},last_call_timeout=2,"
            f"keep_alive_interval={keep_alive_s:g},keep_alive_max_attempt={keep_alive_misses}")


def serve(host: str, port: int) -> None:
    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                     timeout=datetime.timedelta(seconds=300))
    print(f"loomtrain: rendezvous store listening on {host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while store is not None:  # the store serves from this process for as long as it lives
        signal.pause()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loomtrain.launch.rdzv_store", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=29400)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"rdzv_store: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
