"""The hang monitor's pieces: the heartbeat record a rank keeps, who is blamed for a hang (pure), the Slurm
exclude list, and the wrapper around a command. End to end (4 ranks, SIGSTOP, start-up hang, restart from
memory): tests/test_faulttol.py."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from loomtrain.faulttol import heartbeat
from loomtrain.faulttol.hang_monitor import diagnose, exclude_list, limit, process_state, record_failure
from loomtrain.trainer.config import MonitorConfig


def _rec(rank, phase="step", step=10, waiting=True, beat=0.0, steps_timed=10, p99=0.5, **kw):
    r = {"rank": rank, "local_rank": rank, "pid": 1000 + rank, "stage": heartbeat.STAGES[phase], "phase": phase,
         "step": step, "waiting": waiting, "beat": beat, "steps_timed": steps_timed, "p99": p99, "factor": 3.0,
         "min_s": 5.0, "phase_timeout": 60.0, "warmup_steps": 5}
    return r | kw


def _states(records, **override):
    return {r["pid"]: override.get(str(r["rank"]), "S") for r in records}


def test_the_limit_is_3x_p99_with_a_5s_floor_after_warm_up_and_the_phase_timeout_otherwise():
    assert limit(_rec(0, p99=0.5))[0] == 5.0
    assert limit(_rec(0, p99=4.0))[0] == 12.0
    assert limit(_rec(0, steps_timed=3))[0] == 60.0  # warm-up: compilation, first allocations
    assert limit(_rec(0, steps_timed=5))[0] == 60.0  # no step timed after the warm-up yet
    assert limit(_rec(0, phase="checkpoint"))[0] == 60.0 and limit(_rec(0, phase="restore"))[0] == 60.0
    assert limit(_rec(0, phase="data"))[0] == float("inf")  # tokenizing a corpus for hours is not a hang


def test_nothing_is_a_hang_before_the_limit():
    records = [_rec(r, beat=100.0, waiting=r != 2) for r in range(4)]
    assert diagnose(records, _states(records), now=104.9) is None


@pytest.mark.parametrize("case, blamed, cause", [
    ("stopped", [2], "stopped by a signal (process state T); ranks 0, 1, 3 wait for it"),
    ("idle", [1], "not in a collective while ranks 0, 2, 3 wait in one"),
])
def test_the_rank_the_others_wait_for_is_blamed(case, blamed, cause):
    records = [_rec(r, beat=100.0) for r in range(4)]
    states = _states(records)
    if case == "stopped":
        states[1002] = "T"
        records[2]["waiting"] = True  # stopped inside a collective: still the one
    else:
        records[1]["waiting"] = False
    found = diagnose(records, states, now=105.5)
    assert found is not None and found.ranks == blamed and found.cause == cause
    assert found.stalled_s == pytest.approx(5.5) and found.limit_s == 5.0


@pytest.mark.parametrize("case", ["all waiting", "one behind", "all idle"])
def test_with_nobody_to_blame_the_host_restarts_only_after_twice_the_limit_and_blames_no_host(case):
    """All waiting: the hang is elsewhere. One a step behind: ranks can be apart legitimately (local updates,
    pipeline stages). All idle: they may be blocked where the heartbeat cannot see (on the device)."""
    records = [_rec(r, beat=100.0, waiting=case != "all idle") for r in range(4)]
    if case == "one behind":
        records[3]["step"] = 9
    assert diagnose(records, _states(records), now=109.0) is None  # another host's monitor acts first
    found = diagnose(records, _states(records), now=110.5)
    assert found is not None and found.ranks == [] and "on another host" in found.cause
    if case == "one behind":
        assert "ranks [3] a step behind" in found.cause


def test_dead_and_finished_ranks_are_not_watched_and_a_missing_rank_is_named():
    records = [_rec(r, beat=100.0) for r in range(3)]
    states = _states(records)
    assert diagnose(records, {p: None for p in states}, now=1e6) is None  # all gone: the launcher's business
    assert diagnose([dict(r, phase="done") for r in records], states, now=1e6) is None
    found = diagnose(records, states, now=106.0, expected=4)
    assert found is not None and found.ranks == [] and "local rank(s) [3] never wrote a heartbeat" in found.cause


def test_the_record_round_trips_and_step_times_leave_warm_up_and_checkpoints_out(tmp_path):
    """Steps timed on a clock the test advances: a 0.5 s warm-up step, then 0.01 s and 0.05 s steps, a 0.3 s
    checkpoint between steps 3 and 4, and a 0.02 s step 4: the p99 is 0.05 s (warm-up and checkpoint left out)."""
    from loomtrain.faulttol.heartbeat import Heartbeat, read_record, record_path

    now = [100.0]
    hb = Heartbeat(str(tmp_path), rank=3, local_rank=1, attempt=2, clock=lambda: now[0])
    try:
        hb.configure(MonitorConfig(step_factor=4.0, min_s=7.0, warmup_steps=2, phase_timeout_s=99.0), "hostA",
                     str(tmp_path / "out"))
        hb.phase("step")
        for step, seconds in enumerate([0.5, 0.01, 0.05], start=1):  # step 1 is warm-up (compilation)
            now[0] += seconds
            hb.step_done(step)
        hb.phase("checkpoint")
        now[0] += 0.3  # a slow save between steps 3 and 4: not a step's time
        hb.phase("step")
        now[0] += 0.02
        hb.step_done(4)
        before = time.time()
        hb.set_waiting(True)
        rec = read_record(record_path(str(tmp_path), 3))
        assert (rec["rank"], rec["local_rank"], rec["attempt"], rec["pid"]) == (3, 1, 2, os.getpid())
        assert (rec["phase"], rec["step"], rec["steps_timed"], rec["waiting"]) == ("step", 4, 4, True)
        assert (rec["factor"], rec["min_s"], rec["warmup_steps"], rec["phase_timeout"]) == (4.0, 7.0, 2, 99.0)
        assert rec["p99"] == pytest.approx(0.05), rec["p99"]
        assert rec["seq"] % 2 == 0 and before <= rec["beat"] <= time.time()  # the beat is wall-clock time
        side = json.loads(open(record_path(str(tmp_path), 3, "json")).read())
        assert side["host"] == "hostA" and side["output_dir"] == str(tmp_path / "out")
    finally:
        hb.close()
    assert read_record(record_path(str(tmp_path), 3))["phase"] == "done"


def test_without_a_monitor_heartbeats_are_off(monkeypatch):
    monkeypatch.delenv(heartbeat.HEARTBEAT_DIR_ENV, raising=False)
    assert heartbeat.start(0, 0, 0) is None and not heartbeat.watched()
    heartbeat.phase("step")  # no-ops
    heartbeat.step_done(1)


def test_process_state_sees_a_stopped_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        assert process_state(child.pid) in ("S", "R")
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while process_state(child.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_state(child.pid) == "T"
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid) is None


def test_hosts_that_fail_repeatedly_make_the_exclude_list(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    out = str(tmp_path)
    record_failure(out, "gpu-a.cluster", "gpu-a", "stopped", 3)
    record_failure(out, "gpu-b.cluster", "gpu-b", "stopped", 9)
    record_failure(out, "gpu-a.cluster", "gpu-a", "not in a collective", 2)
    with open(os.path.join(out, "health", "failures.jsonl"), "a") as f:
        f.write('{"torn": \n')  # a line a crash cut short is skipped
    assert exclude_list(out, 2) == ["gpu-a"] and exclude_list(out, 1) == ["gpu-a", "gpu-b"]
    assert exclude_list(out, 1, job="78") == [] and exclude_list(str(tmp_path / "none"), 1) == []
    printed = subprocess.run([sys.executable, "-m", "loomtrain.faulttol.hang_monitor", "--exclude-list", out,
                              "--min-failures", "1", "--job", "77"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == "gpu-a,gpu-b"


def test_hosts_slurm_marks_down_or_not_responding_join_the_exclude_list(tmp_path):
    """A host that crashed leaves no failure line (its monitor died with it), but Slurm saw it go: sinfo's
    down, drained and not-responding (``*``) nodes of the job are excluded too; healthy ones are not. A fake
    sinfo on PATH answers as Slurm 22.05 does for ``sinfo -h -N -n LIST -o '%N %T'``."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n"
                                "printf 'gpu-a allocated\\ngpu-b down*\\ngpu-c drained\\ngpu-d mixed\\n"
                                "gpu-e idle*\\ngpu-f completing\\n'\n")
    (fake / "sinfo").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    record_failure(str(tmp_path), "gpu-d.cluster", "gpu-d", "stopped", 1)
    printed = subprocess.run([sys.executable, "-m", "loomtrain.faulttol.hang_monitor", "--exclude-list",
                              str(tmp_path), "--min-failures", "1", "--nodes", "gpu-[a-f]"],
                             capture_output=True, text=True, check=True, env=env)
    assert printed.stdout.strip() == "gpu-b,gpu-c,gpu-d,gpu-e"
    assert (tmp_path / "args").read_text().split() == ["-h", "-N", "-n", "gpu-[a-f]", "-o", "%N", "%T"]
    (fake / "sinfo").write_text("#!/bin/sh\nexit 1\n")  # Slurm unreachable: the hang list still works
    printed = subprocess.run([sys.executable, "-m", "loomtrain.faulttol.hang_monitor", "--exclude-list",
                              str(tmp_path), "--min-failures", "1", "--nodes", "gpu-[a-f]"],
                             capture_output=True, text=True, check=True, env=env)
    assert printed.stdout.strip() == "gpu-d"


def test_the_wrapper_runs_the_command_with_a_heartbeat_directory_and_returns_its_code(tmp_path):
    script = "import os, sys; print(os.path.isdir(os.environ['LOOMTRAIN_HEARTBEAT_DIR'])); sys.exit(3)"
    out = subprocess.run([sys.executable, "-m", "loomtrain.faulttol.hang_monitor", "--nproc", "1", "--",
                          sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 3 and out.stdout.strip() == "True", out.stderr


_WRITER = """
import sys
from loomtrain.faulttol.heartbeat import Heartbeat
hb = Heartbeat(sys.argv[1], 0, 0, 0)
hb.fields["warmup_steps"] = 0
print("ready", flush=True)
step = 0
while True:  # until the test kills it
    step += 1
    hb.step_done(step)  # step and steps_timed move together: a torn copy would show them apart
"""


def test_a_record_caught_mid_write_is_not_returned(tmp_path):
    """The seqlock: an odd counter (a write in progress) or one that moved during the copy is not a record."""
    from loomtrain.faulttol.heartbeat import SEQ_OFFSET, Heartbeat, read_record, record_path

    hb = Heartbeat(str(tmp_path), 0, 0, 0)
    try:
        path = record_path(str(tmp_path), 0)
        assert read_record(path)["seq"] == hb.fields["seq"]
        with open(path, "r+b") as f:  # as if the writer stopped between its two counter updates
            f.seek(SEQ_OFFSET)
            f.write((hb.fields["seq"] + 1).to_bytes(8, "little"))
        assert read_record(path, tries=3) is None
    finally:
        hb.close()


def test_a_record_read_while_it_is_written_is_never_torn(tmp_path):
    """5,000 reads of a record another process rewrites as fast as it can (without the seqlock about 1 copy
    in 1,000 was torn here, so ~5 expected): every one is whole. The writer runs until the reads are done,
    however slow."""
    from loomtrain.faulttol.heartbeat import read_record, record_path

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        steps = []
        while len(steps) < 5_000 or steps[-1] == steps[0]:  # until the reads have overlapped writes
            assert writer.poll() is None, "the writer died"
            rec = read_record(record_path(str(tmp_path), 0))
            if rec is not None:
                assert rec["step"] == rec["steps_timed"], rec
                steps.append(rec["step"])
    finally:
        writer.kill()
        writer.wait()


_RANK = """
import sys, time
from loomtrain.faulttol.heartbeat import Heartbeat
from loomtrain.trainer.config import MonitorConfig
rank, waiting = int(sys.argv[2]), sys.argv[3] == "1"
hb = Heartbeat(sys.argv[1], rank, rank, 0)
hb.configure(MonitorConfig(min_s=0.5, warmup_steps=0), "host-x", sys.argv[4])
hb.phase("step")
hb.step_done(1)
hb.step_done(2)
hb.set_waiting(waiting)
print("ready", flush=True)
while True:
    time.sleep(0.01)  # idle (or "waiting") in Python: the stack shows this line
"""


def test_the_monitor_dumps_stacks_blames_each_host_once_and_kills_the_hung_ranks(tmp_path):
    from loomtrain.faulttol.hang_monitor import HangMonitor

    hb_dir, out = str(tmp_path / "hb"), str(tmp_path / "out")
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, hb_dir, str(r), "1" if r == 0 else "0", out],
                              stdout=subprocess.PIPE, text=True) for r in range(3)]
    try:
        for p in ranks:
            assert p.stdout.readline().strip() == "ready"
        monitor = HangMonitor(hb_dir, expected=3, quiet=True)
        deadline = time.monotonic() + 10
        while not monitor.hangs and time.monotonic() < deadline:
            monitor.poll()
            time.sleep(0.05)
        [hang] = monitor.hangs
        assert hang.ranks == [1, 2] and hang.hosts == {0: "host-x", 1: "host-x", 2: "host-x"}
        for p in ranks[1:]:
            assert p.wait(5) == -signal.SIGKILL
        assert ranks[0].poll() is None  # the waiting rank is left to the launcher
        text = open(hang.report).read()
        assert text.count('File "<string>"') == 3, text  # every rank's stack
        lines = open(os.path.join(out, "health", "failures.jsonl")).read().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["host"] == "host-x"  # one hang of one host: one line
        assert monitor.poll() is None  # acted once: its ranks are the launcher's now
    finally:
        for p in ranks:
            p.kill()
            p.wait()
