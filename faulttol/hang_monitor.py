"""The hang monitor: outside the ranks, it names the rank that hangs, dumps every rank's stack, and has the
launcher restart the job (which then resumes from the in-memory snapshots).

It runs as a thread of loomtrain's launchers (``loomtrain train --nproc N``, the test harness's
``run_ranks_restarting``) or as a process around torchrun (``python -m loomtrain.faulttol.hang_monitor --
torchrun ...``; the generated sbatch script does this on every node), and reads the heartbeat each local
rank keeps (``faulttol/heartbeat.py``). When no local rank has made progress for longer than the limit —
``max(step_factor x p99 step time, min_s)`` during steps (3 x p99 and 5 s by default, after
``warmup_steps``), ``phase_timeout_s`` in start-up, restore, checkpoints and evaluation — it blames, in
this order: ranks stopped by a signal (process state T); ranks not waiting in a collective while others
wait for them (a rank spinning, sleeping, stuck in I/O or a deadlock of its own). When no local rank can be
blamed for sure (every one waits in a collective, or none does, as when they block on the device where the
heartbeat cannot see it), the rank that hangs is on another host (whose monitor acts first) or the network
or device hangs: after twice the limit this monitor restarts its ranks too, blaming no host.

Acting means: one line naming rank, host, pid, phase and step; every live rank's Python stack (SIGUSR2 to
``faulthandler``; a stopped rank is continued first so it can write) in a report under
``<output_dir>/health/``; for a blamed rank, a line in ``<output_dir>/health/failures.jsonl`` (what the Slurm
exclude list counts: a host is blamed only for its own rank's hang, never for waiting on another); and
SIGKILL to the blamed ranks (to all local ranks when none is to blame), which the launcher sees as a
failure: it restarts the group, and the restarted ranks restore from memory.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from loomtrain.faulttol.heartbeat import HEARTBEAT_DIR_ENV, STACK_SIGNAL, UNWATCHED_PHASES, proc_stat, read_record
from loomtrain.fsutil import atomic_write_text
from loomtrain.log import say

FAILURES_FILE = "failures.jsonl"
HEALTH_DIR = "health"


def process_state(pid: int, started: int | None = None) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, D, T, t, ...); None when it is gone, a zombie, or (given
    the start time its record holds) another process that reuses the pid."""
    found = proc_stat(pid)
    if found is None or found[0] in ("Z", "X") or (started is not None and found[1] != started):
        return None
    return found[0]


def limit(rec: dict) -> tuple[float, str]:
    """How long ``rec``'s rank may go without progress in its current phase, and why."""
    if rec["phase"] in UNWATCHED_PHASES:
        return math.inf, f"phase {rec['phase']} is not watched"
    if rec["phase"] == "step" and rec["steps_timed"] > rec["warmup_steps"]:  # p99 of steps after the warm-up
        seconds = max(rec["factor"] * rec["p99"], rec["min_s"])
        return seconds, f"max({rec['factor']:g} x p99 step time {rec['p99']:.3g} s, {rec['min_s']:g} s)"
    return rec["phase_timeout"], f"faulttol.monitor.phase_timeout_s in phase {rec['phase']}"


@dataclass
class Hang:
    culprits: list[dict]  # the blamed ranks' records (empty: a local rank never started)
    cause: str
    stalled_s: float  # since the node's last progress
    limit_s: float
    limit_why: str
    live: list[dict]  # every live local rank's record
    states: dict[int, str]
    report: str | None = None  # the report file, once written
    hosts: dict[int, str] = field(default_factory=dict)  # rank -> host (from the ranks' side files)

    @property
    def ranks(self) -> list[int]:
        return [b["rank"] for b in self.culprits]

    def summary(self) -> str:
        who = ", ".join(f"rank {b['rank']} on host {self.hosts.get(b['rank'], '?')} (pid {b['pid']}; in {b['phase']} "
                        f"after step {b['step']})" for b in self.culprits) or "no local rank"
        return (f"health: HANG: {who}: no progress for {self.stalled_s:.1f} s (limit {self.limit_s:.1f} s = "
                f"{self.limit_why}); {self.cause}")


def diagnose(records: list[dict], states: dict[int, str | None], now: float, expected: int | None = None) -> Hang | None:
    """The hang among one host's ranks, if there is one (pure: records, process states and the clock)."""
    live = [r for r in records if states.get(r["pid"]) is not None and r["phase"] != "done"]
    if not live:
        return None
    stalled = now - max(r["beat"] for r in live)
    limit_s, why = max((limit(r) for r in live), key=lambda x: x[0])
    if stalled < limit_s:
        return None

    def hang(culprits, cause):
        return Hang(culprits, cause, stalled, limit_s, why, live, {r["pid"]: states[r["pid"]] for r in live})

    def others(blamed):
        return ", ".join(str(r["rank"]) for r in live if r not in blamed)

    stopped = [r for r in live if states[r["pid"]] in ("T", "t")]
    if stopped:
        return hang(stopped, "stopped by a signal (process state T)" + (f"; ranks {others(stopped)} wait for it"
                                                                        if len(stopped) < len(live) else ""))
    idle = [r for r in live if not r["waiting"]]
    if idle and len(idle) < len(live):
        return hang(idle, f"not in a collective while ranks {others(idle)} wait in one")
    missing = sorted(set(range(expected or 0)) - {r["local_rank"] for r in live})
    if missing:
        return hang([], f"local rank(s) {missing} never wrote a heartbeat (hung before start-up) while the others "
                        "wait; restarting them all")
    # Nobody here is to blame for sure (all idle: host-side waits the heartbeat cannot see, as on CUDA; all
    # waiting, some a step behind: ranks legitimately apart). Another host's monitor gets the first word.
    if stalled < 2 * limit_s:
        return None
    if idle:
        cause = "no local rank made progress and none waits in a collective"
    else:
        first = min((r["stage"], r["step"]) for r in live)
        behind = [r["rank"] for r in live if (r["stage"], r["step"]) == first]
        cause = "every local rank waits in a collective" + (
            f" (ranks {behind} a step behind the others)" if len(behind) < len(live) else "")
    return hang([], f"{cause}: the rank that hangs is on another host (its monitor names it) or the network or "
                    "device does; restarting this host's ranks")


def read_side(rec: dict) -> dict:
    """What a rank wrote about itself (host, output directory), {} before it configured its heartbeat."""
    try:
        with open(rec["file"] + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def dump_stacks(live: list[dict], states: dict[int, str], wait_s: float = 3.0) -> dict[int, str]:
    """Every live rank's Python stacks (all threads), by rank, through the ranks' faulthandler."""
    sizes = {}
    for r in live:
        path = r["file"] + ".stack"
        sizes[r["rank"]] = os.path.getsize(path) if os.path.exists(path) else 0
        _signal(r["pid"], STACK_SIGNAL)
        if states.get(r["pid"]) in ("T", "t"):
            _signal(r["pid"], signal.SIGCONT)  # a stopped process runs no signal handler
    stacks: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while True:
        for r in live:
            path = r["file"] + ".stack"
            if r["rank"] not in stacks and os.path.exists(path) and os.path.getsize(path) > sizes[r["rank"]]:
                _settle(path)  # faulthandler writes from its signal handler, a write() per line
                if states.get(r["pid"]) in ("T", "t"):
                    _signal(r["pid"], signal.SIGSTOP)  # as it was found: it dumped, it does not train on
                with open(path, errors="replace") as f:
                    f.seek(sizes[r["rank"]])
                    stacks[r["rank"]] = f.read()
        if len(stacks) == len(live) or time.monotonic() > deadline:
            return stacks
        time.sleep(0.01)


def _settle(path: str, quiet_s: float = 0.05, limit_s: float = 1.0) -> None:
    """Wait until ``path`` has not grown for ``quiet_s`` (at most ``limit_s``)."""
    size, since, deadline = os.path.getsize(path), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.01)
        if (now := os.path.getsize(path)) != size:
            size, since = now, time.monotonic()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def record_failure(output_dir: str, host: str, slurm_node: str | None, cause: str, rank: int | None = None) -> None:
    """One line in ``<output_dir>/health/failures.jsonl`` (what the Slurm exclude list counts)."""
    path = os.path.join(output_dir, HEALTH_DIR, FAILURES_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = json.dumps({"time": time.time(), "host": host, "slurm_node": slurm_node, "rank": rank, "cause": cause,
                       "job": os.environ.get("SLURM_JOB_ID")})
    with open(path, "a") as f:  # one short O_APPEND write per line: lines from several hosts do not interleave
        f.write(line + "\n")


def exclude_list(output_dir: str, min_failures: int, job: str | None = None) -> list[str]:
    """Hosts (Slurm node names where known) that failed at least ``min_failures`` times (in ``job`` if given)."""
    counts: dict[str, int] = {}
    try:
        with open(os.path.join(output_dir, HEALTH_DIR, FAILURES_FILE)) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if job and entry.get("job") != job:
                    continue
                name = entry.get("slurm_node") or entry.get("host")
                if name:
                    counts[name] = counts.get(name, 0) + 1
    except FileNotFoundError:
        return []
    return sorted(h for h, n in counts.items() if n >= min_failures)


UNUSABLE_STATES = ("down", "drain", "fail", "maint", "no_respond", "not_responding", "future", "unknown")


def unusable_nodes(nodelist: str) -> list[str]:
    """Nodes of ``nodelist`` (Slurm's syntax) that Slurm marks down, drained, failing or not responding: hosts
    that crashed rather than hung leave no line in failures.jsonl, but Slurm saw them go. Empty when sinfo is
    not there or fails (the hang list still works)."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N %T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    bad = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and (parts[1].endswith("*") or parts[1].lower().startswith(UNUSABLE_STATES)):
            bad.add(parts[0])
    return sorted(bad)


class HangMonitor:
    """Watches the heartbeats under ``directory`` (``expected``: local ranks, when known) and acts on a hang."""

    def __init__(self, directory: str, expected: int | None = None, poll_s: float = 0.25, quiet: bool = False):
        self.directory, self.expected, self.poll_s, self.quiet = directory, expected, poll_s, quiet
        self.hangs: list[Hang] = []
        self._handled: set[int] = set()  # pids already acted on (the launcher is restarting them)
        self._stop = threading.Event()
        self._thread = None
        os.makedirs(directory, exist_ok=True)

    def records(self) -> list[dict]:
        out = []
        for path in sorted(glob.glob(os.path.join(self.directory, "rank*.hb"))):
            rec = read_record(path)
            if rec is not None and rec["pid"] not in self._handled:
                out.append(rec)
        return out

    def poll(self) -> Hang | None:
        records = self.records()
        states = {r["pid"]: process_state(r["pid"], r["started"]) for r in records}
        found = diagnose(records, states, time.time(), self.expected)
        if found is not None:
            self._act(found)
        return found

    def _act(self, found: Hang) -> None:
        sides = {r["rank"]: read_side(r) for r in found.live}
        found.hosts = {rank: side.get("host", "?") for rank, side in sides.items()}
        self._say(found.summary())
        stacks = dump_stacks(found.live, found.states)
        output_dir = next((s["output_dir"] for s in sides.values() if s.get("output_dir")), self.directory)
        found.report = self._write_report(found, stacks, output_dir)
        blamed_hosts = {}  # a host is blamed only for a rank of its own that hung; once per hang
        for r in found.culprits:
            side = sides.get(r["rank"], {})
            blamed_hosts.setdefault((side.get("host", "?"), side.get("slurm_node")), r["rank"])
        for (host, node), rank in blamed_hosts.items():
            record_failure(output_dir, host, node, found.cause, rank)
        blamed = found.culprits or found.live
        for r in blamed:
            _signal(r["pid"], signal.SIGKILL)
        self._handled |= {r["pid"] for r in found.live}
        self._say(f"health: stacks of every rank in {found.report}; killed rank(s) "
                  f"{', '.join(str(r['rank']) for r in blamed)} so the launcher restarts the job")
        self.hangs.append(found)

    def _write_report(self, found: Hang, stacks: dict[int, str], output_dir: str) -> str:
        lines = [found.summary(), "", f"{'rank':>5} {'host':<20} {'pid':>8} state {'phase':<10} {'step':>7} "
                                      f"waiting  idle_s"]
        now = time.time()
        for r in found.live:
            lines.append(f"{r['rank']:>5} {found.hosts.get(r['rank'], '?'):<20} {r['pid']:>8} "
                         f"{found.states.get(r['pid']) or '-':>5} {r['phase']:<10} {r['step']:>7} "
                         f"{'yes' if r['waiting'] else 'no':>7} {now - r['beat']:7.1f}")
        for r in found.live:
            lines += ["", f"---- rank {r['rank']} (pid {r['pid']}) Python stacks ----",
                      stacks.get(r["rank"], "(no stack: the rank did not answer SIGUSR2)").rstrip()]
        first = found.culprits[0]["rank"] if found.culprits else "none"
        path = os.path.join(output_dir, HEALTH_DIR, f"hang-{time.strftime('%Y%m%d-%H%M%S')}-rank{first}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    def _say(self, line: str) -> None:
        if not self.quiet:
            say(line)

    def start(self) -> "HangMonitor":
        self._thread = threading.Thread(target=self._run, name="hang-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the monitor must outlive anything odd in a record
                self._say(f"health: hang monitor: {type(e).__name__}: {e}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@contextlib.contextmanager
def watching(nproc: int | None):
    """A monitor in this process for the block, on a fresh heartbeat directory that the processes started
    inside it inherit (``LOOMTRAIN_HEARTBEAT_DIR``); what the launchers and the command line use."""
    directory = tempfile.mkdtemp(prefix="loomtrain-heartbeat-")
    os.environ[HEARTBEAT_DIR_ENV] = directory
    monitor = HangMonitor(directory, nproc).start()
    try:
        yield monitor
    finally:
        monitor.stop()
        os.environ.pop(HEARTBEAT_DIR_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- command line: around torchrun, and the exclude list
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loomtrain.faulttol.hang_monitor",
                                description="Run a command (torchrun ...) with its ranks' hangs watched, or print "
                                            "the hosts that failed repeatedly.")
    p.add_argument("--nproc", type=int, default=None, help="local ranks the command starts (names ranks that never "
                                                           "start)")
    p.add_argument("--exclude-list", metavar="OUTPUT_DIR", default=None,
                   help="print the hosts with at least --min-failures failures (comma-separated) and exit")
    p.add_argument("--min-failures", type=int, default=2)
    p.add_argument("--job", default=None, help="with --exclude-list: count this Slurm job's failures only")
    p.add_argument("--nodes", default=None, help="with --exclude-list: also the nodes of this Slurm node list that "
                                                 "Slurm marks down, drained, failing or not responding")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    if args.exclude_list:
        hosts = set(exclude_list(args.exclude_list, args.min_failures, args.job))
        print(",".join(sorted(hosts | set(unusable_nodes(args.nodes or "")))))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    with watching(args.nproc):
        child = subprocess.Popen(command)
        for sig in (signal.SIGTERM, signal.SIGINT):  # scancel, Ctrl-C: the command decides what they mean
            signal.signal(sig, lambda signum, _: child.send_signal(signum))
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
