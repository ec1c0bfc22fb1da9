"""One trainer state: disk checkpoints and memory snapshots keep exactly the same parts, and a part added to
``Trainer.state`` (one line) is saved, restored on resume, and lives in both."""
import os

from conftest import run_ranks


class Counter:
    """A stateful part of a plugin's own: how many steps it has seen."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _parts_on_disk(path: str) -> set:
    """Part names in a DCP checkpoint: per-rank and tensor parts at the top, the rest under ``trainer``."""
    import torch.distributed.checkpoint as dcp

    names = set()
    for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata:
        top, _, rest = key.partition(".")
        if top == "trainer":
            if rest.split(".")[0] != "step":
                names.add(rest.split(".")[0])
        elif top not in ("model", "optim"):
            names.add(top)
    return names


def _train(rank, overrides, resume, add_part):
    import loomtrain.trainer.train as train_mod
    from loomtrain.launch.train import run
    from loomtrain.trainer.config import load_config

    seen = {}
    init, step = train_mod.Trainer.__init__, train_mod.Trainer.train_step

    def init_with_counter(self, *args, **kwargs):
        if add_part:  # before the restore inside __init__ reads the state: wrap the build, add the part first
            build = train_mod.FaultTolerance

            def ft(*a, **k):
                self.counter = Counter()
                self.state.parts["counter"] = self.counter  # the one line
                return build(*a, **k)

            train_mod.FaultTolerance = ft
            try:
                init(self, *args, **kwargs)
            finally:
                train_mod.FaultTolerance = build
        else:
            init(self, *args, **kwargs)
        seen["memory"] = set(self.state.host_state())
        seen["resumed_counter"] = getattr(self, "counter", Counter()).n

    def counted_step(self):
        if hasattr(self, "counter"):
            self.counter.n += 1
        return step(self)

    train_mod.Trainer.__init__, train_mod.Trainer.train_step = init_with_counter, counted_step
    r = run(load_config("tiny", overrides), resume=resume)
    return seen, r.checkpoint


def test_disk_and_memory_keep_the_same_parts(overrides, tmp_path):
    ov = overrides + ["train.steps=2", "checkpoint.at_end=true"]
    [(seen, ckpt)] = run_ranks(_train, 0, ov, None, False)
    assert seen["memory"] == {"scheduler", "sampler", "rng", "dp_sync"}
    assert _parts_on_disk(ckpt) == seen["memory"]


def test_a_part_added_in_one_line_is_saved_and_restored(overrides, tmp_path):
    out = tmp_path / "run"
    ov = overrides + ["train.steps=3", "checkpoint.at_end=true", f"train.output_dir={out}"]
    [(seen, ckpt)] = run_ranks(_train, 0, ov, None, True)
    assert "counter" in seen["memory"] and "counter" in _parts_on_disk(ckpt)
    more = [o for o in ov if not o.startswith("train.steps=")] + ["train.steps=5"]
    [(resumed, _)] = run_ranks(_train, 0, more, os.path.join(out, "checkpoints", "step_00000003"), True)
    assert resumed["resumed_counter"] == 3  # restored from disk, not counted again from 0
