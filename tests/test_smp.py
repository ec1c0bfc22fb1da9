"""The snapshot daemon owns shared memory: a SIGKILLed writer loses nothing, torn or corrupt epochs are
never served, two epochs are kept, a broken client costs only its own request, a restarted daemon adopts
its predecessor's epochs, stale generations are fenced off, and only the user's processes get in."""
import json
import os
import signal
import socket
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from loomtrain.faulttol.smp import SHM_DIR_ENV, Attached, SMPError, SnapshotClient, load_secret, start_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount a tmpfs / switch uid)")


def _start(sock, prefix, env=None):
    # Its own session: not a child a trainer's process group could take down with it.
    proc = subprocess.Popen([sys.executable, "-m", "loomtrain.faulttol.smp", "--socket", sock, "--prefix", prefix],
                            start_new_session=True, env=env)
    client = SnapshotClient(sock)
    for _ in range(400):
        if client.alive(timeout_s=1.0):
            return proc
        assert proc.poll() is None, "the SMP exited at start"
        time.sleep(0.05)
    raise AssertionError("the SMP did not start")


@pytest.fixture
def smp(tmp_path):
    sock = str(tmp_path / "smp.sock")
    prefix = f"lt-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    proc = _start(sock, prefix)
    yield SnapshotClient(sock), prefix, proc
    if proc.poll() is None:
        SnapshotClient(sock).shutdown()
        proc.wait(10)
    assert not segments(prefix), "shared memory leaked"


def segments(prefix, shm="/dev/shm"):
    return sorted(f for f in os.listdir(shm) if f.startswith(prefix))


def raw_request(sock, payload: bytes, read=True):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(payload)
        return s.makefile("rb").readline() if read else None


WRITER = """
import sys, time, torch
from loomtrain.faulttol.smp import SnapshotClient
sock, ready = sys.argv[1:3]
c = SnapshotClient(sock)
c.write_epoch(1, {"w": torch.arange(1000, dtype=torch.float32), "step": torch.tensor([1])})
c.write_epoch(2, {"w": torch.zeros(1000), "step": torch.tensor([2])}, commit=False)  # torn: never committed
open(ready, "w").close()
time.sleep(60)
"""


def test_sigkilled_writer_loses_nothing_and_torn_epoch_is_ignored(smp, tmp_path):
    client, prefix, _ = smp
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, client.socket_path, str(ready)])
    for _ in range(600):
        if ready.exists():
            break
        time.sleep(0.05)
    assert ready.exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    time.sleep(0.2)
    assert len(segments(prefix)) == 4  # epoch 1 (2 segments) and the torn epoch 2 (2) all survive the kill
    epoch, state = client.read_latest()
    assert epoch == 1  # the torn epoch 2 was never committed: never served
    assert torch.equal(state["w"], torch.arange(1000, dtype=torch.float32)) and state["step"].item() == 1
    client._call(op="free_uncommitted")
    assert len(segments(prefix)) == 2


def test_two_epochs_kept_segments_reused_and_corruption_falls_back(smp):
    client, prefix, _ = smp
    names = set()
    for e in range(1, 7):
        client.write_epoch(e, {"x": torch.full((10,), float(e), dtype=torch.bfloat16)})
        names |= {ep["owners"]["0"]["x"]["name"] for ep in client._call(op="latest")["epochs"]}
        assert len(segments(prefix)) == min(e, 2)  # never a third epoch's worth, not even while writing
    assert len(names) == 2  # six snapshots, two segments: the oldest epoch's segment serves the next one
    newest = client._call(op="latest")["epochs"][0]["owners"]["0"]["x"]["name"]
    with open(f"/dev/shm/{newest}", "r+b") as f:  # a bit flip in the newest epoch
        f.seek(3)
        b = f.read(1)
        f.seek(3)
        f.write(bytes([b[0] ^ 0x40]))
    epoch, state = client.read_latest()
    assert epoch == 5 and torch.equal(state["x"], torch.full((10,), 5.0, dtype=torch.bfloat16))


@needs_root
def test_full_shm_is_refused_at_alloc_not_by_sigbus_later(tmp_path):
    """tmpfs allocates lazily: a size check passes for every rank, then writers die of SIGBUS. Reserve for real."""
    shm = tmp_path / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shm)], check=True)
    sock, prefix = str(tmp_path / "s.sock"), "lt-full"
    proc = _start(sock, prefix, env=dict(os.environ, **{SHM_DIR_ENV: str(shm)}))
    try:
        client = SnapshotClient(sock)
        first = client.alloc("a", 600 << 10, epoch=1)
        with pytest.raises(SMPError, match=r"cannot hold a segment of 0\.6 MiB \(No space left on device"):
            client.alloc("b", 600 << 10, epoch=1)  # 600 KiB more do not fit in 1 MiB: refused now
        assert segments(prefix, shm) == [first]
        client.shutdown()
        proc.wait(10)
        assert segments(prefix, shm) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["umount", str(shm)], check=True)


def test_a_client_that_dies_or_misbehaves_costs_only_its_request(smp):
    client, prefix, proc = smp
    client.write_epoch(1, {"w": torch.arange(100, dtype=torch.float32)})
    secret = load_secret(client.socket_path)
    sock = client.socket_path
    # A trainer SIGKILLed between send and reply: the request arrives, nobody reads the answer.
    raw_request(sock, json.dumps({"op": "latest", "secret": secret}).encode() + b"\n", read=False)
    for bad in (b"this is not json\n", b'{"op": "commit", "secret": "%s"}\n' % secret.encode(),
                b'{"op": "alloc", "size": "many", "key": 1, "epoch": 1, "secret": "%s"}\n' % secret.encode(),
                b'["a list"]\n', b'{"op": "latest"}\n', '{"op": "latest", "secret": "\u00e9"}\n'.encode(),
                b"[" * 100000 + b"\n"):
        reply = json.loads(raw_request(sock, bad))
        assert "error" in reply, bad
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:  # connected, sends nothing
        stalled.connect(sock)
        t0 = time.monotonic()
        epoch, state = client.read_latest()  # others are served meanwhile
        assert time.monotonic() - t0 < 5
    assert proc.poll() is None and epoch == 1 and torch.equal(state["w"], torch.arange(100, dtype=torch.float32))
    assert len(segments(prefix)) == 1


def test_sigterm_frees_everything_and_a_sigkilled_smp_is_adopted(tmp_path):
    sock, prefix = str(tmp_path / "s.sock"), f"lt-adopt-{os.getpid()}"
    proc = _start(sock, prefix)
    client = SnapshotClient(sock)
    client.write_epoch(3, {"w": torch.arange(10, dtype=torch.float32)})
    client.write_epoch(4, {"w": torch.ones(10)}, commit=False)  # torn
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert len(segments(prefix)) == 2  # nobody could unlink them
    proc = _start(sock, prefix)  # the successor finds the index and adopts epoch 3
    try:
        epoch, state = client.read_latest()
        assert epoch == 3 and torch.equal(state["w"], torch.arange(10, dtype=torch.float32))
        assert len(segments(prefix)) == 1  # the torn epoch's segment went
    finally:
        proc.send_signal(signal.SIGTERM)  # scancel / a time limit
        proc.wait(10)
    assert proc.returncode == 0 and segments(prefix) == []
    assert not os.path.exists(sock)


def test_generations_are_fenced_and_eviction_keeps_the_newest(smp):
    client, prefix, _ = smp
    old = SnapshotClient(client.socket_path, run="A", attempt=0)
    new = SnapshotClient(client.socket_path, run="A", attempt=1)
    old.register(0)
    old.write_epoch(10, {"w": torch.zeros(4)})
    new.register(0)  # the restarted trainer
    with pytest.raises(SMPError, match="attempt 0 of run .A. refused: attempt 1 is running"):
        old.register(0)
    with pytest.raises(SMPError, match="refused: this node serves run 'A' attempt 1"):
        old.write_epoch(12, {"w": torch.zeros(4)})  # a zombie of the old attempt cannot commit
    for e in (98, 100):
        new.write_epoch(e, {"w": torch.full((4,), float(e))})
    assert [ep["epoch"] for ep in client._call(op="latest")["epochs"]] == [100, 98]
    with pytest.raises(SMPError, match=r"epoch 52 is older than the 2 complete epochs held \[98, 100\]"):
        new.write_epoch(52, {"w": torch.zeros(4)})
    new.write_epoch(100, {"w": torch.full((4,), 7.0)})  # a re-commit replaces (and frees) what it had
    epoch, state = SnapshotClient(client.socket_path).read_latest()
    assert epoch == 100 and state["w"].tolist() == [7.0] * 4
    new.write_epoch(102, {"w": torch.zeros(4)})
    assert len(segments(prefix)) == 2  # two epochs of one segment: nothing leaked by the refusal or re-commit
    SnapshotClient(client.socket_path, run="B").register(0)  # a fresh run: run A's epochs can never serve it
    assert client._call(op="latest")["epochs"] == [] and segments(prefix) == []


def test_directory_socket_names_and_peers_are_checked(tmp_path, smp):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(SMPError, match="must be a directory owned by uid .* with mode 0700"):
        start_daemon(str(open_dir), 0)
    client, prefix, _ = smp
    assert stat.S_IMODE(os.stat(client.socket_path).st_mode) == 0o600
    with pytest.raises(SMPError, match="invalid segment name"):
        Attached("../../tmp/x")
    reply = json.loads(raw_request(client.socket_path, b'{"op": "shutdown", "secret": "guess"}\n'))
    assert reply["error"].startswith("snapshot: unauthorized")
    assert client.alive()


@needs_root
def test_other_users_are_refused():
    d = tempfile.mkdtemp(prefix="lt-peer-")  # under /tmp: pytest's own directories are closed to others
    sock = os.path.join(d, "s.sock")
    proc = _start(sock, f"lt-peer-{os.getpid()}")
    client = SnapshotClient(sock)
    try:
        os.chmod(d, 0o755)
        os.chmod(sock, 0o666)  # even with the file modes opened up, the peer's uid is checked
        secret = load_secret(sock)
        pid = os.fork()
        if pid == 0:
            try:
                os.setuid(65534)
                line = raw_request(sock, json.dumps({"op": "shutdown", "secret": secret}).encode() + b"\n")
                os._exit(0 if line == b"" else 1)
            except ConnectionResetError:  # closed on us without an answer
                os._exit(0)
            except BaseException as e:
                print(f"other user: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # connected, closed without an answer
        assert proc.poll() is None and client.alive()
    finally:
        os.chmod(d, 0o700)
        client.shutdown()
        proc.wait(10)
        shutil.rmtree(d)


def test_a_dead_smps_leftovers_are_adopted_by_its_successor_and_swept_by_others():
    """SIGKILLed with its job (no SIGTERM handler runs): an SMP started for the same directory adopts the
    committed epochs; an SMP started anywhere else on the host removes them once nobody will."""
    from loomtrain.faulttol.smp import segment_prefix, socket_path, stop_daemons, sweep_dead

    d = tempfile.mkdtemp(prefix="loomtrain-smp-")  # where jobs' SMP directories live
    try:
        pid = start_daemon(d, 0)
        client = SnapshotClient(socket_path(d, 0))
        client.write_epoch(1, {"w": torch.ones(1000)})
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = start_daemon(d, 0)  # the successor: its start must not sweep its own directory
        epoch, state = client.read_latest()
        assert epoch == 1 and torch.equal(state["w"], torch.ones(1000))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert d in sweep_dead()  # e.g. another job's SMP starting on this host
        assert segments(segment_prefix(d, 0)) == [] and not os.path.exists(socket_path(d, 0))
        start_daemon(d, 0)  # and a later SMP in the same directory starts clean
        assert SnapshotClient(socket_path(d, 0)).read_latest() is None
        stop_daemons(d, [0])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_busy_smp_is_not_replaced_and_idle_exit_waits_for_its_trainers(tmp_path):
    from loomtrain.faulttol.smp import SnapshotDaemon, ensure_daemon, socket_path, stop_daemons

    d = str(tmp_path / "smp")
    pid = start_daemon(d, 0, idle_exit_s=1.0)
    try:
        with pytest.raises(SMPError, match="another snapshot process serves"):
            SnapshotDaemon(socket_path(d, 0), "lt-second")  # would have adopted, and unlinked, our segments
        SnapshotClient(socket_path(d, 0), run="r").register(0)  # this process is the node's trainer
        os.kill(pid, signal.SIGSTOP)  # stalled (a huge allocation), not dead
        try:
            with pytest.raises(SMPError, match="alive but not answering"):
                ensure_daemon(d, 0)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(2.5)  # > idle_exit_s without a request, but its trainer lives: it must stay
        assert SnapshotClient(socket_path(d, 0)).alive()
    finally:
        stop_daemons(d, [0])


def test_an_epoch_committed_on_some_nodes_only_never_evicts_the_last_sealed_one(smp):
    """Node B's commit of 3 failed: A holds 3 unsealed. Allocating and committing 4 (also failing elsewhere)
    must leave A's sealed epoch 2, the newest every node has."""
    client, prefix, _ = smp
    for e in (1, 2):
        client.write_epoch(e, {"w": torch.full((4,), float(e))})  # sealed
    for e in (3, 4):
        entries = client.write_epoch(e, {"w": torch.full((4,), float(e))}, commit=False)
        client.commit(e, "0", entries)  # committed here, never sealed: the trainers did not all commit it
    held = {ep["epoch"]: ep["complete"] for ep in client._call(op="latest")["epochs"]}
    assert held.get(2) is True and held.get(3) is False and held.get(4) is False, held


def test_a_dead_smps_leftovers_are_swept_at_the_next_start():
    """SIGKILLed with its job (no SIGTERM handler runs): its segments and socket stay until the next SMP
    started on the host, here another job's, removes them as it starts."""
    from loomtrain.faulttol.smp import segment_prefix, socket_path, stop_daemons

    dead, other = (tempfile.mkdtemp(prefix="loomtrain-smp-") for _ in range(2))  # where jobs' SMP directories live
    try:
        pid = start_daemon(dead, 0)
        SnapshotClient(socket_path(dead, 0)).write_epoch(1, {"w": torch.ones(1000)})
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert len(segments(segment_prefix(dead, 0))) == 1 and os.path.exists(socket_path(dead, 0))
        start_daemon(other, 0)
        assert segments(segment_prefix(dead, 0)) == [] and not os.path.exists(socket_path(dead, 0))
    finally:
        for d in (dead, other):
            stop_daemons(d, [0])  # what is still running or left over
            shutil.rmtree(d, ignore_errors=True)


def test_the_shutdown_reply_is_written_before_the_smp_stops_serving(tmp_path, monkeypatch):
    """CI once lost this race: the serving loop saw the stop flag and the process exited while the connection
    thread was still writing the reply, so the client read nothing. A slow reply writer must not lose it."""
    import loomtrain.faulttol.smp as smp_module
    from loomtrain.faulttol.smp import SnapshotDaemon
    d = tmp_path / "smp"
    d.mkdir(mode=0o700)
    daemon = SnapshotDaemon(str(d / "s.sock"), f"lt-race-{os.getpid()}")
    served, seen = threading.Event(), {}
    real_dumps = json.dumps

    def slow_dumps(obj, *a, **kw):
        if obj == {"ok": True} and "served" not in seen:
            time.sleep(0.6)  # longer than the serving loop's 0.2 s accept timeout
            seen["served"] = served.is_set()
        return real_dumps(obj, *a, **kw)

    def ask():
        client = SnapshotClient(str(d / "s.sock"))
        while not client.alive(timeout_s=1.0):
            time.sleep(0.05)
        monkeypatch.setattr(smp_module.json, "dumps", slow_dumps)
        try:
            client.shutdown()
            seen["reply"] = True
        except SMPError as e:
            seen["reply"] = str(e)

    asker = threading.Thread(target=ask)
    asker.start()
    daemon.serve()  # signal handlers need the main thread
    served.set()
    asker.join(10)
    assert seen["served"] is False, "the SMP stopped serving before its shutdown reply was written"
    assert seen["reply"] is True
