"""A launch owns its run: its ranks die with the launcher, and its output directory is locked against a second run.

Real ``loomtrain train --nproc 2`` processes (the tiny test model, 1 thread per rank), whose ranks are found by
scanning /proc for the run's output directory in their command line. When the death signal is armed is checked in
forked children.
"""
import ctypes
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time

from loomtrain.launch.netns import running as _alive

PR_GET_PDEATHSIG = 2
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "LOOMTRAIN_LAUNCHER_PID")

LONG = ["train.steps=100000", "train.log_every=1"]  # runs until killed


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]




def _processes_of(marker: str, exclude: int) -> list[int]:
    """Live processes (but ``exclude``) whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (exclude, os.getpid()):
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and _alive(int(name)):
            found.append(int(name))
    return found


def _start_long_run(overrides, out, log):
    """``loomtrain train --nproc 2`` on ``out`` in a session of its own, returned once it logged a step."""
    launcher = subprocess.Popen(["loomtrain", "train", "--nproc", "2"] + _sets(overrides + LONG),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert launcher.poll() is None, f"the launcher exited with {launcher.returncode}"
        assert time.monotonic() < deadline, "no step logged in 240 s"
        time.sleep(0.2)
    return launcher


def _gone_within(pids, seconds: float) -> list[int]:
    """The ``pids`` still alive after waiting up to ``seconds`` for them to exit."""
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill_all(launcher, out):
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait()
    for pid in _processes_of(str(out), exclude=launcher.pid):  # orphans left by a broken build
        os.kill(pid, signal.SIGKILL)


def test_ranks_die_when_their_launcher_is_sigkilled(overrides, tmp_path):
    """SIGKILL to the launcher alone (ranks run in sessions of their own, so a process-group kill misses them):
    both ranks stop within seconds instead of training on into the output directory."""
    out = tmp_path / "run"
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = _start_long_run(overrides, out, log)
    try:
        ranks = _processes_of(str(out), exclude=launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.wait()
        assert _gone_within(ranks, 30) == [], (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        _kill_all(launcher, out)


def test_a_second_run_on_a_held_output_directory_fails_until_the_first_is_killed(overrides, tmp_path):
    """While a run holds the output directory, a second ``loomtrain train --nproc 2`` and a bare
    ``python -m loomtrain.launch.train`` on it exit 2 with one line naming the directory and the holder's pid
    and host; once the first run is SIGKILLed (its lock dies with it), a new run on the directory trains."""
    out = tmp_path / "run"
    with open(tmp_path / "launcher.log", "w") as log:  # no hang kill of its ranks, stopped below
        first = _start_long_run(overrides + ["faulttol.monitor.min_s=3600"], out, log)
    try:
        ranks = _processes_of(str(out), exclude=first.pid)
        for pid in ranks:  # the launcher holds the lock; its ranks' training would only slow the runs below
            os.kill(pid, signal.SIGSTOP)
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        short = _sets(overrides + ["train.steps=2"])
        for args in (["loomtrain", "train", "--nproc", "2"] + short,
                     [sys.executable, "-m", "loomtrain.launch.train", "tiny"] + short):
            p = subprocess.run(args, capture_output=True, text=True, timeout=300)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2, (args[:4], p.stderr[-3000:])
            assert len(lines) == 1 and lines[0].startswith("error: train.output_dir:"), p.stderr[-3000:]
            assert f"'{out}' is in use by another run ({holder}" in lines[0], lines[0]
        assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # the file names the holder
        assert first.poll() is None  # the refused runs left the first alone
        first.kill()
        first.wait()
        assert _gone_within(ranks, 30) == []
        p = subprocess.run(["loomtrain", "train"] + short, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])["step"] == 2
    finally:
        _kill_all(first, out)


def _arm_in_child(env: dict, conn) -> None:
    """In a forked child with only ``env`` of the launcher variables: whether ``die_with_launcher`` armed, and the
    death signal the kernel holds for this process."""
    from loomtrain.launch.train import die_with_launcher

    for k in LAUNCHER_VARS:
        os.environ.pop(k, None)
    os.environ.update(env)
    armed = die_with_launcher()
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    conn.send((armed, sig.value))


def _arm_forked(env: dict):
    """(exit code, what ``_arm_in_child`` sent or None) of a forked child."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_arm_in_child, args=(env, child))
    p.start()
    child.close()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
    try:
        return p.exitcode, parent.recv()
    except EOFError:  # it died without a word
        return p.exitcode, None


def test_only_a_launched_rank_arms_the_parent_death_signal():
    """A process started from a shell (neither torch elastic's nor loomtrain's launcher variable) arms nothing;
    a torch elastic worker arms SIGKILL with the kernel."""
    assert _arm_forked({}) == (0, (False, 0))
    assert _arm_forked({"TORCHELASTIC_RUN_ID": "run"}) == (0, (True, signal.SIGKILL))


def test_a_rank_whose_launcher_died_before_it_armed_kills_itself():
    """The launcher's pid (``LOOMTRAIN_LAUNCHER_PID``) is no longer this process's parent: the death signal came
    too late to fire, so the rank SIGKILLs itself instead of training as an orphan."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is nobody's parent now
    assert _arm_forked({"TORCHELASTIC_RUN_ID": "run", "LOOMTRAIN_LAUNCHER_PID": str(gone.pid)}) == \
        (-signal.SIGKILL, None)
