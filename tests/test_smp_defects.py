"""Defects of the snapshot process (SMP) found in review, each pinned by a test: files another user plants in
/dev/shm never stop an SMP, its sweep or a job's cleanup, and segment names cannot be guessed; a secret that does
not match is one clear error; chunk sizes that drift between snapshots still reuse the oldest epoch's segments;
an SMP dies with the launcher it watches, not with a hangup, and a live one's files are never removed; a stale
trainer can neither free a newer attempt's segments nor stop the SMP."""
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch

from loomtrain.faulttol.smp import (SMPError, SnapshotClient, _alive, job_directory, load_secret,
                                   secret_path, secure_directory, segment_capacity, segment_prefix, socket_path,
                                   start_daemon, stop_daemons, sweep_dead)
from loomtrain.faulttol.smp import LAUNCHER_PID_ENV
from test_smp import _start, needs_root, segments

NOBODY = 65534


def _wait_gone(pid: int, seconds: float = 20.0) -> bool:
    """Reap (it is our child) or wait for process ``pid`` to end; True if it did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            if not _alive(pid):
                return True
        time.sleep(0.05)
    return False


def _plant(name: str, immutable: bool, owner: int = NOBODY) -> str:
    """A file ``owner`` (another user) made in /dev/shm; ``immutable``: one no one can remove, root included."""
    path = os.path.join("/dev/shm", name)
    with open(path, "wb") as f:
        f.write(b"not yours")
    os.chown(path, owner, owner)
    if immutable:
        subprocess.run(["chattr", "+i", path], check=True)
    return path


@needs_root
@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr to make a file no one can remove")
def test_files_another_user_plants_in_shm_never_stop_the_smp_its_sweep_or_the_job_cleanup(tmp_path, monkeypatch):
    """Planted before the SMP starts: one under the prefix a job's directory alone gives (what the SMP used to
    name its segments by), two under the real prefix as if its name leaked: one nobody can remove, one only
    root could; and a file of this user under it that cannot be removed (made immutable by an admin, say).
    The SMP must start and serve, its sweep after a SIGKILL and the Slurm cleanup CLI must succeed, saying so
    in at most one line, and no other user's file may be touched. A new secret names segments anew."""
    out, job = str(tmp_path / "out"), f"h3-{os.getpid()}"
    monkeypatch.setenv("SLURM_JOB_ID", job)
    d = job_directory(out, job)
    guessable = f"lt{zlib.crc32(os.path.abspath(d).encode()):08x}n0"  # from the job directory alone
    planted = []
    try:
        secure_directory(d)
        load_secret(socket_path(d, 0), create=True)
        prefix = segment_prefix(d, 0)
        assert not prefix.startswith(guessable)
        planted = [_plant(f"{guessable}-planted0000", immutable=True),
                   _plant(f"{prefix}-planted0001", immutable=True),
                   _plant(f"{prefix}-planted0002", immutable=False),
                   _plant(f"{prefix}-planted0003", immutable=True, owner=os.getuid())]

        pid = start_daemon(d, 0)  # adopts: its predecessor's leftovers are removed, the planted ones must not be
        client = SnapshotClient(socket_path(d, 0))
        for e in (1, 2, 3):
            client.write_epoch(e, {"w": torch.full((1000,), float(e))})
        ours = [n for n in segments(prefix) if "planted" not in n]
        assert len(ours) == 2 and all(n.startswith(prefix + "-") for n in ours)
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid)
        assert d in sweep_dead()  # as another SMP starting on the host does
        assert [n for n in segments(prefix) if "planted" not in n] == []

        start_daemon(d, 0)
        client.write_epoch(4, {"w": torch.ones(10)})
        cli = subprocess.run([sys.executable, "-m", "loomtrain.faulttol.smp", "--cleanup-job", out],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert len([line for line in cli.stderr.splitlines() if "planted" in line]) <= 1  # one line for all
        assert not os.path.exists(d) and [n for n in segments(prefix) if "planted" not in n] == []
        assert all(os.path.exists(p) for p in planted)  # other users' never tried (nobody's removable one too)

        secure_directory(d)  # the same job directory again: a new secret, other names
        load_secret(socket_path(d, 0), create=True)
        assert segment_prefix(d, 0) != prefix
    finally:
        try:
            if os.path.isdir(d):
                stop_daemons(d, [0])
        finally:
            shutil.rmtree(d, ignore_errors=True)
            for p in planted:
                if os.path.exists(p):
                    subprocess.run(["chattr", "-i", p], check=False)
                    os.unlink(p)


def _as_another_user_make_the_job_directory(out: str, job: str, victim_uid: int) -> str | None:
    """What another user of the host can do in /tmp: run loomtrain's own naming for ``out`` and ``job`` as if it
    were ``victim_uid`` and create that directory first. Returns the directory it made, or None if it found no
    name (in a forked child that drops to nobody)."""
    import tempfile

    made = os.path.join(tempfile.mkdtemp(), "made")
    os.chmod(os.path.dirname(made), 0o777)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.getuid = lambda: victim_uid  # the uid in a name is no secret
            try:
                d = job_directory(out, job)
            except (OSError, SMPError):
                d = None
            if d:
                os.mkdir(d, 0o700)
                with open(made, "w") as f:
                    f.write(d)
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    try:
        with open(made) as f:
            return f.read()
    except FileNotFoundError:
        return None
    finally:
        shutil.rmtree(os.path.dirname(made))


@needs_root
def test_another_user_cannot_create_a_jobs_smp_directory_first():
    """H3, the directory: a bare torchrun or Slurm job's SMP directory is in /tmp, where anyone may create a name
    first, and a directory that is not the job's own is refused (snapshots off). Another user who knows the
    output directory, the job id and the uid, and runs loomtrain's own naming, must not find the name: it is
    keyed by a random key kept 0600 in the output directory (before the job's first start there is none, and
    only the job can write one). A key file another user planted is refused with one line, not used."""
    import tempfile

    root = tempfile.mkdtemp()
    os.chmod(root, 0o755)  # an output directory others may read, as on a shared filesystem
    out = os.path.join(root, "out")
    os.mkdir(out, 0o755)
    made, theirs = [], []
    try:
        for job in (f"h3-first-{os.getpid()}", f"h3-requeued-{os.getpid()}"):  # before any key, and after
            if (d := _as_another_user_make_the_job_directory(out, job, os.getuid())) is not None:
                theirs.append(d)
            mine = job_directory(out, job)
            made.append(mine)
            assert not theirs and secure_directory(mine) == mine, theirs  # no SMPError: ours, 0700
            st = os.stat(os.path.join(out, ".smp-key"))
            assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o600
        os.chown(os.path.join(out, ".smp-key"), NOBODY, NOBODY)  # planted by another user
        with pytest.raises(SMPError, match=r"\.smp-key must be a file owned by uid 0 with mode 0600"):
            job_directory(out, "another")
    finally:
        shutil.rmtree(root)
        for d in made + theirs:
            shutil.rmtree(d, ignore_errors=True)


def test_a_secret_that_does_not_match_is_one_clear_error_not_endless_reconnects(tmp_path):
    """The SMP keeps the secret it started with; a secret file rewritten since used to make the client reconnect
    until RecursionError (not an SMPError, so nothing caught it) and alive() raise instead of saying False."""
    sock = str(tmp_path / "s.sock")
    proc = _start(sock, f"lt-m5-{os.getpid()}")
    original = load_secret(sock)
    try:
        with open(secret_path(sock), "w") as f:
            f.write("0" * 64)
        client = SnapshotClient(sock)
        with pytest.raises(SMPError, match=f"{sock}.*secret mismatch"):
            client._call(op="ping")
        assert client.alive() is False
    finally:
        with open(secret_path(sock), "w") as f:
            f.write(original)
        SnapshotClient(sock).shutdown()
        proc.wait(10)


def test_chunks_that_drift_in_size_reuse_the_oldest_epochs_segments(tmp_path):
    """Peak memory is two epochs (the oldest complete one's segments serve the next snapshot), also when chunk
    sizes drift: 'a' grows by 56 bytes a snapshot (a new segment each time, before), 'b' by 3% (more than a
    segment's headroom: grown in place), 'c' shrinks. The data read back is each chunk's own length, also from
    a successor that adopted the segments, which are larger than the chunks they hold."""
    sock, prefix = str(tmp_path / "s.sock"), f"lt-m2-{os.getpid()}"
    proc = _start(sock, prefix)
    client = SnapshotClient(sock)
    try:
        for e in range(1, 8):
            sizes = {"a": 200_000 + 56 * e, "b": int(100_000 * 1.03 ** e), "c": 5_000 - 8 * e}
            state = {k: torch.arange(n, dtype=torch.int64).to(torch.uint8) + e for k, n in sizes.items()}
            entries = client.write_epoch(e, state, commit=False)  # written, not yet committed: the peak
            held = segments(prefix)
            on_disk = sum(os.path.getsize(f"/dev/shm/{n}") for n in held)
            assert len(held) <= 2 * len(sizes), (e, held)  # never a third epoch's worth of segments
            assert on_disk <= 2 * sum(segment_capacity(n) for n in sizes.values()) * 9 // 8, (e, on_disk)
            client.commit(e, "0", entries)
            client.seal(e)
            epoch, read = client.read_latest()
            assert epoch == e and all(torch.equal(read[k], state[k]) for k in sizes)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _start(sock, prefix)  # adopts segments larger than the chunks their entries record
        epoch, read = client.read_latest()
        assert epoch == 7 and all(torch.equal(read[k], state[k]) for k in sizes)
    finally:
        if proc.poll() is None:
            SnapshotClient(sock).shutdown()
            proc.wait(10)
    assert segments(prefix) == []


def test_an_smp_dies_with_the_launcher_it_watches_not_with_a_hangup(tmp_path, monkeypatch):
    """A launcher SIGKILLed (or hung up) runs no cleanup: the SMPs it started watch its pid and free everything
    when it is gone (node 0 told by argument, node 1 by the launcher's pid its ranks inherit, as an SMP a rank
    restarts is).
    SIGHUP is not a reason to drop a job's snapshots. A live process with the pid but another start time is not
    the one watched."""
    d = str(tmp_path / "smp")
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pid0 = start_daemon(d, 0, watch_pid=launcher.pid)
        monkeypatch.setenv(LAUNCHER_PID_ENV, str(launcher.pid))
        pid1 = start_daemon(d, 1)
        monkeypatch.delenv(LAUNCHER_PID_ENV)
        client = SnapshotClient(socket_path(d, 0))
        client.write_epoch(1, {"w": torch.ones(100)})
        os.kill(pid0, signal.SIGHUP)
        time.sleep(0.3)
        assert client.alive() and client.read_latest()[0] == 1  # a hangup changes nothing
        launcher.kill()
        launcher.wait()
        assert _wait_gone(pid0) and _wait_gone(pid1), "an SMP outlived the launcher it watched"
        assert segments(segment_prefix(d, 0)) == [] and not os.path.exists(socket_path(d, 0))
        assert not os.path.exists(socket_path(d, 1))

        sock = str(tmp_path / "reused" / "s.sock")
        os.makedirs(os.path.dirname(sock), mode=0o700)
        reused = subprocess.Popen([sys.executable, "-m", "loomtrain.faulttol.smp", "--socket", sock, "--prefix",
                                   f"lt-m6-{os.getpid()}", "--watch-pid", f"{os.getpid()}:1"], start_new_session=True)
        assert reused.wait(20) == 0  # this process lives, but did not start at tick 1: not the one watched
    finally:
        if launcher.poll() is None:
            launcher.kill()
        stop_daemons(d, [0, 1])


def test_a_busy_smps_files_are_never_removed_by_stop_or_sweep(tmp_path):
    """An SMP too busy to answer (here SIGSTOPped) is alive: a stop that gets no answer sends it SIGTERM and
    leaves its segments and socket to it (it frees them when it gets to run), and a sweep skips it."""
    d = str(tmp_path / "smp")
    pid = start_daemon(d, 0)
    prefix = segment_prefix(d, 0)
    SnapshotClient(socket_path(d, 0)).write_epoch(1, {"w": torch.ones(100)})
    os.kill(pid, signal.SIGSTOP)
    try:
        assert d not in sweep_dead()
        stop_daemons(d, [0], timeout_s=1.0)
        assert len(segments(prefix)) == 1 and os.path.exists(socket_path(d, 0))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _wait_gone(pid), "the SIGTERM of the stop was not acted on"
    assert segments(prefix) == [] and not os.path.exists(socket_path(d, 0))


def test_a_stale_trainer_can_neither_free_a_newer_attempts_segments_nor_stop_the_smp(tmp_path):
    """free_uncommitted and shutdown are fenced by (run, attempt) like alloc and commit; the operator's stop (the
    launcher's, the job cleanup's) still stops any SMP."""
    d = str(tmp_path / "smp")
    pid = start_daemon(d, 0)
    prefix = segment_prefix(d, 0)
    sock = socket_path(d, 0)
    old, new = SnapshotClient(sock, run="A", attempt=0), SnapshotClient(sock, run="A", attempt=1)
    try:
        old.register(0)
        new.register(0)
        new.alloc("w", 4096, epoch=5)  # being written by the current attempt
        with pytest.raises(SMPError, match="attempt 0 refused"):
            old._call(op="free_uncommitted", run="A", attempt=0)
        with pytest.raises(SMPError, match="attempt 0 refused"):
            old.shutdown()
        stop_daemons(d, [0], run="A", attempt=0)  # a stale trainer's clean end
        assert new.alive() and len(segments(prefix)) == 1
        new.free_uncommitted()
        assert segments(prefix) == []
    finally:
        stop_daemons(d, [0])  # the operator's
    assert _wait_gone(pid) and not os.path.exists(sock)


def test_a_temporary_file_left_by_a_killed_writer_does_not_keep_a_job_directory_forever(tmp_path, monkeypatch):
    """A SIGKILL inside an atomic write leaves ``.tmp-*`` next to the secret; the sweep removes the directory
    once that file is stale (it kept the directory, and failed a later job's leftover check, before). A fresh
    temporary file is a live writer's: the directory stays."""
    from loomtrain.faulttol import smp

    monkeypatch.setattr(smp.tempfile, "gettempdir", lambda: str(tmp_path))
    d = tmp_path / (smp.SMP_DIR_PREFIX + "0-deadbeef")
    d.mkdir(mode=0o700)
    (d / "secret").write_text("x" * 64)
    temp = d / ".tmp-abc123"
    temp.write_text("{}")
    old = time.time() - 3600  # older than STALE_TEMP_S and the sweep's own minimum age
    os.utime(d, (old, old))
    smp.sweep_dead()
    assert d.exists()  # a writer may still be busy with it
    os.utime(temp, (old, old))
    os.utime(d, (old, old))
    smp.sweep_dead()
    assert not d.exists()
