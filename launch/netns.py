"""Hosts on one machine, for tests and benchmarks of losing one: each host is a network namespace
with its own mount namespace and its own tmpfs as ``/dev/shm``, wired to the others by a veth pair and a
bridge (living in a namespace of its own, so nothing touches the machine's network).

Everything a host runs descends from the processes started with ``HostCluster.spawn`` (torchrun's agent,
its ranks, the snapshot process they start), so it all shares that host's ``/dev/shm`` and its ``TMPDIR``
(``/dev/shm/tmp``; files outside it, such as the output directory, are shared as on a cluster's filesystem). ``kill`` loses the
host whole: every process in its namespace gets SIGKILL, and with the last one its tmpfs, and all the
snapshot chunks in it, are gone. Its sockets close, so peers see the loss at once, as after a kernel
panic with a switch that resets connections; a host that vanishes silently is left to the collective
timeouts and the watchdog. Needs root and iproute2 (``../shared/design/TESTING.md``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

SUBNET = "10.79.0"  # private: it exists only inside these namespaces
HOST_TMP = "/dev/shm/tmp"  # each host's TMPDIR: private to it, like a real host's /tmp


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str
    interface: str  # the host's end of its veth pair: GLOO_SOCKET_IFNAME


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class HostCluster:
    """``with HostCluster(["a", "b"]) as cluster: cluster.spawn("a", argv)``; torn down on exit, also
    after a failure (every process killed, every namespace deleted)."""

    def __init__(self, names: list[str], shm_size: str = "512m"):
        if os.geteuid() != 0:
            raise PermissionError("launch/netns.py: network namespaces need root")
        tag = uuid.uuid4().hex[:4]
        self.tag, self.shm_size = tag, shm_size
        self.switch = f"lt{tag}sw"
        self.hosts = {name: Host(name, f"lt{tag}{name}", f"{SUBNET}.{i + 1}", f"lt{tag}v{i}")
                      for i, name in enumerate(names)}
        self._made: list[str] = []

    def __enter__(self) -> "HostCluster":
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _up(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values()):
            _ip("netns", "add", host.namespace)
            self._made.append(host.namespace)
            peer = f"lt{self.tag}p{i}"
            _ip("link", "add", host.interface, "type", "veth", "peer", "name", peer)
            _ip("link", "set", host.interface, "netns", host.namespace)
            _ip("link", "set", peer, "netns", self.switch)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", peer, "master", "br0")
            _ip("-n", self.switch, "link", "set", peer, "up")

    def spawn(self, name: str, argv: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
        """Start ``argv`` on host ``name``, inside its namespaces and with its ``/dev/shm``; output to ``log``."""
        host = self.hosts[name]
        # Its own temporary directory too (where snapshot processes keep their sockets), on its own tmpfs.
        script = (f'mount -t tmpfs -o size={self.shm_size},mode=1777 tmpfs /dev/shm && mkdir -m 700 {HOST_TMP} '
                  f'&& exec "$@"')
        cmd = ["ip", "netns", "exec", host.namespace, "unshare", "--mount", "--propagation", "private", "--",
               "sh", "-c", script, "sh", *argv]
        full_env = dict(os.environ, GLOO_SOCKET_IFNAME=host.interface, TMPDIR=HOST_TMP, **(env or {}))
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            return subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log:
                out.close()

    def spawn_agent(self, name: str, store: str, nnodes: int, rdzv_id: str, overrides: list[str], log: str,
                    join_timeout_s: int = 600, max_restarts: int = 3, env: dict | None = None) -> subprocess.Popen:
        """Start host ``name``'s training agent (``loomtrain.launch.agent``, one rank, ``--nnodes=N:N``) meeting
        the others at ``store`` (HOST:PORT); a dead agent is dropped after 3 missed 1 s keep-alives. The host
        is ``LOOMTRAIN_HOST_ID=host-<name>``: its snapshots are found by host, whatever rank it gets."""
        from loomtrain.launch.rdzv_store import AGENT_ENV, agent_rdzv_conf

        argv = [sys.executable, "-m", "loomtrain.launch.agent", f"--nnodes={nnodes}:{nnodes}", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={store}", f"--rdzv-id={rdzv_id}",
                f"--rdzv-conf={agent_rdzv_conf(join_timeout_s, keep_alive_s=1, keep_alive_misses=3)}",
                f"--max-restarts={max_restarts}", "--monitor-interval=0.5", f"--local-addr={self.hosts[name].address}",
                "-m", "loomtrain.launch.train", "tiny"] + [a for o in overrides for a in ("--set", o)]
        return self.spawn(name, argv, env={"LOOMTRAIN_HOST_ID": f"host-{name}", **AGENT_ENV, **(env or {})}, log=log)

    def pids(self, name: str) -> list[int]:
        """Every process running on host ``name``."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts[name].namespace], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self, name: str, timeout_s: float = 10.0) -> int:
        """Lose host ``name`` whole: SIGKILL every process on it (again, until none is left: a process may
        fork meanwhile); its tmpfs goes with the last one. Returns how many processes were killed."""
        killed, deadline = set(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = [p for p in self.pids(name) if p not in killed or running(p)]
            if not pids:
                return len(killed)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"host {name}: processes still running after SIGKILL: {self.pids(name)}")

    def close(self) -> None:
        for name in self.hosts:
            if self.hosts[name].namespace in self._made:
                try:
                    self.kill(name)
                except TimeoutError:
                    pass
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()


def read_log(path: str) -> str:
    """A host's log so far ('' before it exists)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
