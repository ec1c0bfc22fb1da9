"""The snapshot daemon owns shared memory: a SIGKILLed writer loses nothing, torn or corrupt epochs are
never served, two epochs are kept, nothing leaks after shutdown."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from loomtrain.faulttol.smp import SnapshotClient


@pytest.fixture
def smp(tmp_path):
    sock = str(tmp_path / "smp.sock")
    prefix = f"lt-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    # Its own session: not a child a trainer's process group could take down with it.
    proc = subprocess.Popen([sys.executable, "-m", "loomtrain.faulttol.smp", "--socket", sock, "--prefix", prefix],
                            start_new_session=True)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    yield SnapshotClient(sock), prefix, proc
    if proc.poll() is None:
        SnapshotClient(sock).shutdown()
        proc.wait(10)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix)], "shared memory leaked"


def segments(prefix):
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix))


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


def test_two_epochs_kept_and_corruption_falls_back(smp):
    client, prefix, _ = smp
    for e in (1, 2, 3):
        client.write_epoch(e, {"x": torch.full((10,), float(e), dtype=torch.bfloat16)})
    assert len(segments(prefix)) == 2  # epoch 1 unlinked when 3 was committed
    newest = client._call(op="latest")["epochs"][0]["owners"]["0"]["x"]["name"]
    with open(f"/dev/shm/{newest}", "r+b") as f:  # a bit flip in the newest epoch
        f.seek(3)
        b = f.read(1)
        f.seek(3)
        f.write(bytes([b[0] ^ 0x40]))
    epoch, state = client.read_latest()
    assert epoch == 2 and torch.equal(state["x"], torch.full((10,), 2.0, dtype=torch.bfloat16))


def test_full_dev_shm_is_a_clear_error(smp):
    client, prefix, _ = smp
    with pytest.raises(RuntimeError, match=r"snapshot: /dev/shm has .* MiB free, segment 'huge' needs"):
        client._call(op="alloc", key="huge", size=1 << 50)
    assert segments(prefix) == []
