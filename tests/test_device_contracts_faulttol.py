"""The CUDA paths of the snapshots and the straggler timing, run on CPU against fake devices that keep CUDA's
contract: work queued on a stream runs later than the host's call returns, in stream order, and the host may
read what the device wrote only after waiting on an event recorded after it."""
import threading

import pytest
import torch

from conftest import run_ranks
from loomtrain.comms import traffic
from loomtrain.faulttol.health import HealthMonitor

# ---------------------------------------------------------------- snapshot staging (issue 23, item 9)


class FakeStream:
    """A stream of :class:`FakeCopies`: its work runs in order, at once (``eager``: the earliest a device could)
    or only when something waits for it (the latest)."""

    def __init__(self, dev):
        self.dev, self.work, self.done = dev, [], 0

    def enqueue(self, fn) -> None:
        with self.dev.lock:
            self.work.append(fn)
            if self.dev.eager:
                self.run_to(len(self.work))

    def run_to(self, n: int) -> None:
        with self.dev.lock:
            while self.done < n:
                self.done += 1
                self.work[self.done - 1]()

    def wait_stream(self, other) -> None:
        n = len(other.work)
        self.enqueue(lambda: other.run_to(n))

    def record_event(self):
        stream, n = self, len(self.work)

        class Event:
            def synchronize(self):
                stream.run_to(n)

        return Event()


class FakeCopies:
    """Stands in for ``CudaCopies``: records every pinned allocation and how many bytes the device has read."""

    def __init__(self, eager: bool):
        self.eager, self.lock = eager, threading.RLock()
        self.current = FakeStream(self)
        self.pinned_sizes: list[int] = []
        self.bytes_read = 0

    def stream(self):
        return FakeStream(self)

    def current_stream(self):
        return self.current

    def pinned(self, nbytes: int) -> torch.Tensor:
        self.pinned_sizes.append(nbytes)
        return torch.zeros(nbytes, dtype=torch.uint8)

    def copy(self, stream, pairs) -> None:
        def run(dst, src):
            dst.copy_(src)
            self.bytes_read += src.numel()

        for dst, src in pairs:
            stream.enqueue(lambda d=dst, s=src: run(d, s))


BUFFER = 1024  # bytes per pinned buffer in these tests; the payload is over 10x that


def _staged_through_fake_device(rank, smp_dir, eager):
    """One rank, device "cuda" on a fake device: two snapshots, each taken while the step's last update
    (x2 on every state tensor) is still queued on the current stream and followed, once ``before_update``
    returned, by the next update (+1) queued there. Returns the pinned allocations, the payload size, and per
    snapshot: bytes the device had read when ``before_update`` returned, staged bytes == the state after
    the queued update and before the next."""
    import torch.distributed as dist

    from loomtrain.faulttol.layout import NodeLayout
    from loomtrain.faulttol.smp import SMPError
    from loomtrain.faulttol.snapshot import PinnedStaging, Snapshotter, _as_bytes, flatten_state
    from loomtrain.trainer.config import FaultTolConfig

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 40), torch.nn.Linear(40, 3))  # big and tiny tensors
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    opt.step()  # the optimizer state exists
    dev = FakeCopies(eager)
    snap = Snapshotter(NodeLayout.from_config(FaultTolConfig(), 1, 1), 0, smp_dir, "sig", 0, torch.device("cuda"),
                       copier=PinnedStaging(dev, buffer_bytes=BUFFER))

    def no_smp():
        raise SMPError("no snapshot process in this test: the snapshot stops after its copy")

    snap._smp_up = no_smp
    live = flatten_state(model, opt)[0]
    tensor_bytes = sum(t.numel() * t.element_size() for t in live)
    out = []
    for step in (1, 2):
        expected = torch.cat([_as_bytes(t.detach() * 2) for t in live])
        for t in live:
            dev.current.enqueue(lambda t=t: t.detach().mul_(2))  # the step's update, not yet run by the device
        dev.bytes_read = 0
        snap.start(step, model, opt, {})
        snap.before_update()
        read = dev.bytes_read
        for t in live:
            dev.current.enqueue(lambda t=t: t.detach().add_(1))  # the next update
        dev.current.run_to(len(dev.current.work))
        snap.wait()
        failures = snap.poll()
        out.append((read, torch.equal(snap._staging[:tensor_bytes], expected), failures))
    return dev.pinned_sizes, tensor_bytes, out


@pytest.mark.parametrize("eager", [False, True], ids=["device-late", "device-early"])
def test_cuda_staging_pins_two_fixed_buffers_and_stages_the_state_between_the_updates(eager, tmp_path):
    """On a fake CUDA device whose copies run as late (or as early) as CUDA allows: every pinned allocation is
    one BUFFER (two in all, reused by the second snapshot) for a payload over 10x that, not a payload-sized
    block; ``before_update`` returns only once the device has read every byte of the state; and the staged
    bytes are the state after the step's queued update and before the next one, so the copies are ordered
    after the step (late device) and a buffer is refilled only after the host copied it out (early device)."""
    pinned, tensor_bytes, snapshots = run_ranks(_staged_through_fake_device, 1, str(tmp_path / "smp"), eager)[0]
    assert tensor_bytes > 10 * BUFFER
    assert pinned == [BUFFER, BUFFER]
    for read, staged_right, failures in snapshots:
        assert read == tensor_bytes
        assert staged_right
        assert len(failures) == 1 and "no snapshot process in this test" in failures[0], failures


# ---------------------------------------------------------------- straggler timing (issue 23, item 7)


class FakeCuda:
    """One timeline for the host and a device stream: the host's calls return at once, the device runs what
    was queued in order and is idle while nothing is (``free_at``: when it finishes what it holds). Its
    ``Event`` stands in for ``torch.cuda.Event``: it is reached when the device gets to it, and its time can
    be read only once the host's clock has passed that (else CUDA says "not ready")."""

    def __init__(self):
        self.host = self.free_at = 0.0
        self.stalls = 0  # synchronize calls that had to wait for the device
        self.stream = object()
        dev = self

        class Event:
            def __init__(self, enable_timing=False):
                self.timing, self.at = enable_timing, None

            def record(self, stream=None):
                self.at = dev.free_at = max(dev.free_at, dev.host)

            def query(self):
                return self.at is not None and dev.host >= self.at

            def synchronize(self):
                if not self.query():
                    dev.stalls += 1
                    dev.host = self.at

            def elapsed_time(self, end):
                if not (self.timing and end.timing):
                    raise RuntimeError("Both events must be created with argument 'enable_timing=True'")
                if not (self.query() and end.query()):
                    raise RuntimeError("CUDA error: device not ready")
                return (end.at - self.at) * 1000.0

        self.Event = Event

    def launch(self, seconds: float) -> None:
        """Queue device work of ``seconds``; the host goes on at once."""
        self.free_at = max(self.free_at, self.host) + seconds

    def host_sync(self) -> None:
        """What the step's exchange does (a device-to-host copy): the host waits until the device is done."""
        self.host = max(self.host, self.free_at)


def test_on_cuda_the_monitor_reports_device_time_outside_collectives_not_host_time(monkeypatch):
    """A fake CUDA device: each step the batch takes 2 ms of host time, the compute 100 + 20 ms of device
    time, and a collective between them keeps the device waiting 40 ms for its peers, all returning to the
    host at once. The monitor reports busy = 122 ms (step minus the collective) and data = 2 ms, each step's
    one step later (its events are read once done), and reading them never stalls the host; host clocks
    would say 2 ms busy."""
    dev = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", dev.Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: dev.stream)
    wait = traffic._timed(lambda: dev.launch(0.040))  # a Work.wait the main thread makes, as wrapped
    monitor = HealthMonitor(["a", "b"], False, clock=lambda: dev.host, blocked=traffic.blocked_seconds,
                            device_type="cuda")
    reported = []
    try:
        for _ in range(3):
            monitor.start()
            dev.host += 0.002  # waiting for the batch
            monitor.data_ready()
            dev.launch(0.100)
            wait()
            dev.launch(0.020)
            monitor.stop()
            reported.append((monitor.busy, monitor.data))
            traffic._timed(lambda: dev.launch(0.5))()  # the exchange's collective: after stop, not counted
            dev.host_sync()
    finally:
        traffic.set_device_marker(None)
    assert reported[0] == (0.0, 0.0)
    for busy, data in reported[1:]:
        assert busy == pytest.approx(0.122) and data == pytest.approx(0.002)
    assert dev.stalls == 0
